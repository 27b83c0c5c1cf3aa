"""Corpora: scanning LibriSpeech-layout folders, and the built-in synthetic LibriSpeech and Speech Commands."""
