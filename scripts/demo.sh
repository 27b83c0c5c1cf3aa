#!/usr/bin/env bash
# The whole fedhubert pipeline on the built-in synthetic corpora, stage by stage, then the run report.
# Each stage writes its own folder under DEMO_DIR with its resolved config, log and run record.
# SC_STEPS: S3PRL speech_commands training steps per evaluation (SUPERB uses 200,000; this is a demo).
set -euo pipefail
DEMO_DIR=${DEMO_DIR:-data/demo}
FEDHUBERT=${FEDHUBERT:-fedhubert}
SC_STEPS=${SC_STEPS:-1000}
run() { echo "+ $*"; "$@"; }

run "$FEDHUBERT" synth librispeech --out "$DEMO_DIR/LibriSpeech" --speakers 24 --minutes 1.5 --force
run "$FEDHUBERT" synth speech-commands --out "$DEMO_DIR/speech_commands" --force
run "$FEDHUBERT" partition --corpus "$DEMO_DIR/LibriSpeech" --out "$DEMO_DIR/partition" --clients 4 --force
# Per-utterance normalised MFCC: on these corpora raw-MFCC clusters follow each speaker's recording channel
# (kmeans.json's label_quality shows it; see README).
run "$FEDHUBERT" kmeans --partition "$DEMO_DIR/partition" --out "$DEMO_DIR/kmeans" --force features.normalize=utterance
# The centralized baseline: the tiny preset on every client's training data pooled (one shared codebook), with the
# federated run's compute (10 rounds x 15 local steps x 4 clients = 600 updates of 40 s batches), validated on the
# same held-out speakers as the server (dev-clean). Learning rates and schedules are the defaults (the preset's
# rate, warm-up and decay fitted to the run); the demo only chooses the runs' length and a smaller batch (40 s of
# audio) so that they fit a laptop's minutes.
manifests=$(printf '"%s",' "$DEMO_DIR"/partition/client_*/train.tsv); labels=$(printf '"%s",' "$DEMO_DIR"/kmeans/client_*/train.km)
run "$FEDHUBERT" train-local --out "$DEMO_DIR/central" --preset tiny --steps 600 --force \
  "train_manifests=[${manifests%,}]" "train_labels=[${labels%,}]" \
  --valid-manifest "$DEMO_DIR/partition/global/dev-clean.tsv" --valid-labels "$DEMO_DIR/kmeans/global/dev-clean.km" \
  eval_every=60 checkpoint_every=600 train.log_every=60 train.data.batch_seconds=40
run "$FEDHUBERT" export --checkpoint "$DEMO_DIR/central/checkpoints/final.pt" --format s3prl-hubert \
  --out "$DEMO_DIR/central/hubert_s3prl.pt" --force
# Federated pretraining: 4 clients, FedAvg, 10 rounds of the tiny preset (a real Flower simulation). The server's
# held-out gain over the label-frequency baseline should rise from below 0 (pretrain.png, report.md).
run "$FEDHUBERT" pretrain --partition "$DEMO_DIR/partition" --kmeans "$DEMO_DIR/kmeans" --out "$DEMO_DIR/pretrain" \
  --preset tiny --rounds 10 --local-steps 15 --force train.data.batch_seconds=40 train.log_every=1000
run "$FEDHUBERT" export --checkpoint "$DEMO_DIR/pretrain/checkpoints/final.pt" --format s3prl-hubert \
  --out "$DEMO_DIR/pretrain/hubert_s3prl.pt" --force
# Federated distillation: a 1-layer DistilHuBERT student of the federated teacher.
run "$FEDHUBERT" distill --teacher "$DEMO_DIR/pretrain/checkpoints/final.pt" --partition "$DEMO_DIR/partition" \
  --out "$DEMO_DIR/distill" --rounds 4 --local-steps 15 --force student.layers=1 train.data.batch_seconds=40 \
  train.log_every=1000
run "$FEDHUBERT" export --checkpoint "$DEMO_DIR/distill/checkpoints/final.pt" --format s3prl-distiller \
  --out "$DEMO_DIR/distill/distiller_s3prl.pt" --force
# A linear probe of the frozen models on the keyword clips (speaker-disjoint 5-fold): trained vs random init.
run "$FEDHUBERT" probe --dataset "$DEMO_DIR/speech_commands" --checkpoint "$DEMO_DIR/central/checkpoints/final.pt" \
  --checkpoint "$DEMO_DIR/pretrain/checkpoints/final.pt" --checkpoint "$DEMO_DIR/distill/checkpoints/final.pt" \
  --random-init --out "$DEMO_DIR/probe" --force
# SUPERB keyword spotting with S3PRL's own speech_commands recipe (shortened): the federated teacher, the same
# architecture untrained, the distilled student, and S3PRL's fbank baseline, on the same synthetic data.
evaluate() { run "$FEDHUBERT" evaluate speech-commands --dataset "$DEMO_DIR/speech_commands" --steps "$SC_STEPS" \
  --eval-step $((SC_STEPS / 4)) --force "$@"; }
evaluate --checkpoint "$DEMO_DIR/pretrain/checkpoints/final.pt" --name "federated teacher" --out "$DEMO_DIR/eval/teacher"
evaluate --checkpoint "$DEMO_DIR/pretrain/checkpoints/final.pt" --random-init --name "random-init teacher" \
  --out "$DEMO_DIR/eval/random_init"
evaluate --checkpoint "$DEMO_DIR/distill/checkpoints/final.pt" --name "distilled student" --out "$DEMO_DIR/eval/student"
evaluate --baseline fbank --out "$DEMO_DIR/eval/fbank"
run "$FEDHUBERT" report "$DEMO_DIR"

echo
echo "Demo finished. Outputs:"
echo "  $DEMO_DIR/LibriSpeech        synthetic LibriSpeech (SPEAKERS.TXT, subsets, run.json)"
echo "  $DEMO_DIR/speech_commands    synthetic Speech Commands v0.01 and its test set"
echo "  $DEMO_DIR/partition          4 speaker-disjoint clients: manifests, partition.json, summary.md, clients.png"
echo "  $DEMO_DIR/kmeans             federated MFCC k-means (K=100): client_<i>/{train,valid}.km, codebook.npy, kmeans.json"
echo "  $DEMO_DIR/central            centralized tiny HuBERT baseline: checkpoints/, training.png, hubert_s3prl.pt"
echo "  $DEMO_DIR/pretrain           federated tiny HuBERT (FedAvg, 4 clients): checkpoints/, metrics.jsonl,"
echo "                               tensorboard/, pretrain.png, messages.jsonl, hubert_s3prl.pt"
echo "  $DEMO_DIR/distill            federated DistilHuBERT student of that teacher: checkpoints/, distill.png,"
echo "                               distiller_s3prl.pt"
echo "  $DEMO_DIR/probe              linear probe of the frozen models vs random init: probe.json, probe.md"
echo "  $DEMO_DIR/eval               S3PRL speech_commands runs (<name>/s3prl/log.log) and results.md"
echo
echo "Report: $DEMO_DIR/report.md (plots in $DEMO_DIR/report/)"
