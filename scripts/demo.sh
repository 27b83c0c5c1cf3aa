#!/usr/bin/env bash
# The fedhubert pipeline on the built-in synthetic corpora, stage by stage (the stages that exist so far).
# Each stage writes its own folder under DEMO_DIR with its resolved config, log and run record.
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-data/demo}
FEDHUBERT=${FEDHUBERT:-fedhubert}
run() { echo "+ $*"; "$@"; }

run "$FEDHUBERT" synth librispeech --out "$DEMO_DIR/LibriSpeech" --speakers 24 --minutes 1.5 --force
run "$FEDHUBERT" synth speech-commands --out "$DEMO_DIR/speech_commands" --force
run "$FEDHUBERT" partition --corpus "$DEMO_DIR/LibriSpeech" --out "$DEMO_DIR/partition" --clients 4 --force
run "$FEDHUBERT" kmeans --partition "$DEMO_DIR/partition" --out "$DEMO_DIR/kmeans" --force

echo
echo "Demo finished. Outputs:"
echo "  $DEMO_DIR/LibriSpeech        synthetic LibriSpeech (SPEAKERS.TXT, subsets, run.json)"
echo "  $DEMO_DIR/speech_commands    synthetic Speech Commands v0.01 and its test set"
echo "  $DEMO_DIR/partition          4 speaker-disjoint clients: manifests, partition.json, summary.md, clients.png"
echo "  $DEMO_DIR/kmeans             federated MFCC k-means (K=100): client_<i>/{train,valid}.km, codebook.npy, kmeans.json"
