"""The audio reader refuses what a speech model cannot use, naming the file and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from fedhubert.audio import audio_info, read_audio, write_audio
from fedhubert.errors import AudioError


def tone(seconds: float = 0.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_round_trip_of_16k_mono_flac_and_wav(tmp_path):
    for name in ("a.flac", "a.wav"):
        write_audio(tmp_path / name, tone())
        info = audio_info(tmp_path / name)
        assert (info.sample_rate, info.channels, info.num_samples) == (16000, 1, 8000)
        np.testing.assert_allclose(read_audio(tmp_path / name), tone(), atol=1 / 16384)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.flac", "a.wav"]  # no temporary files left


def test_stereo_is_refused_with_the_sox_fix(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(), tone()], axis=1), 16000)
    with pytest.raises(AudioError, match=r"stereo.wav: 2 channels \(expected mono\).*sox .* -c 1"):
        read_audio(path)


def test_wrong_sample_rate_is_refused_with_the_sox_fix(tmp_path):
    path = tmp_path / "rate.flac"
    sf.write(path, tone(rate=22050), 22050)
    with pytest.raises(AudioError, match=r"rate.flac: sample rate 22050 Hz \(expected 16000\).*sox .* -r 16000"):
        read_audio(path)


def test_zero_length_wav_is_refused(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty.wav: empty \(no samples\)"):
        read_audio(path)


def test_truncated_and_garbage_files_are_refused(tmp_path):
    write_audio(tmp_path / "full.flac", tone(2.0))
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 3])
    (tmp_path / "junk.flac").write_bytes(b"not audio at all" * 10)
    with pytest.raises(AudioError, match="cut.flac"):
        read_audio(tmp_path / "cut.flac")
    with pytest.raises(AudioError, match=r"cannot read the header of .*junk.flac"):
        read_audio(tmp_path / "junk.flac")
    with pytest.raises(AudioError, match="missing.flac"):
        audio_info(tmp_path / "missing.flac")


def test_flac_without_a_length_in_its_header_is_refused(tmp_path):
    write_audio(tmp_path / "ok.flac", tone())
    data = bytearray((tmp_path / "ok.flac").read_bytes())
    assert data[:4] == b"fLaC"
    data[21] &= 0xF0  # STREAMINFO: zero the 36-bit total-samples field (as a streaming encoder leaves it)
    data[22:26] = bytes(4)
    (tmp_path / "stream.flac").write_bytes(data)
    with pytest.raises(AudioError, match=r"stream.flac: no length in the header.*sox"):
        audio_info(tmp_path / "stream.flac")


def test_unsupported_suffix_is_refused(tmp_path):
    with pytest.raises(AudioError, match="unsupported suffix"):
        write_audio(tmp_path / "a.mp3", tone())
