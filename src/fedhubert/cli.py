"""The `fedhubert` command: one subcommand per pipeline stage.

Every stage takes `--config FILE` (a YAML file like those in configs/; without it, the built-in defaults, which
configs/ mirrors), any number of `KEY=VALUE` overrides (`model.layers=2`), `--print-config` to show the resolved
config without running, and writes its resolved config, log and run record beside its outputs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from fedhubert import __version__
from fedhubert.config import KeyDoc, Override, absolute_paths, describe_fields, dump_config, load_config
from fedhubert.errors import EXIT_STOPPED, ConfigError, FedhubertError, StageStopped
from fedhubert.runlog import CONFIG_FILE, setup_logging, stage_run

log = logging.getLogger("fedhubert")


# A flag of a stage: a shorthand for one config key, (--flag, key), whose type, help and default are the key's; or
# (--flag, key, convert) for a flag whose text `convert` turns into the key's value (named for argparse's messages).
Flag = tuple[str, str] | tuple[str, str, Callable[[str], Any]]


@dataclass(frozen=True)
class Stage:
    """A runnable stage: its subcommand (words joined by "-" give its `name`, as run.json records it and configs/
    names its file), help of the command and of --out, its config class (kept in a light module, for --help), the
    entries it owns in its output folder, its entry point as "module:function" (imported only when the stage
    runs), its flags, and the keys that may change when resuming (empty: the stage cannot resume)."""

    command: tuple[str, ...]
    help: str
    out_help: str
    config_cls: type
    owned: Sequence[str]
    entry: str
    flags: tuple[Flag, ...] = ()
    resume_keys: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return "-".join(self.command)


# Subcommands that group stages: help, and the title and metavar of their stages.
_GROUPS = {
    "synth": ("write the built-in synthetic corpora (espeak-ng speakers)", "corpora", "CORPUS"),
    "evaluate": ("SUPERB downstream evaluation with S3PRL", "tasks", "TASK"),
}


def _config_epilog(docs: Sequence[KeyDoc]) -> str:
    width = max(len(doc.key) for doc in docs)
    lines = ["config keys (set in --config FILE or as KEY=VALUE):"]
    for doc in docs:
        lines.append(f"  {doc.key:<{width}}  {doc.help} [{doc.type_name}; default {doc.default!r}]")
    return "\n".join(lines)


def _add_flag(
    parser: argparse.ArgumentParser, flag: str, doc: KeyDoc, convert: Callable[[str], Any] | None = None
) -> None:
    """`flag` as a shorthand for the key `doc` describes: a switch setting a bool key to true, a repeatable flag
    giving a list key one item each time, or one value read by `convert` or as the key's type."""
    dest, help_text = f"flag_{doc.key}", doc.help.replace("%", "%%")  # argparse %-formats help
    if convert is None and doc.type is bool:
        parser.add_argument(flag, dest=dest, action="store_const", const="true", help=f"{help_text} (= {doc.key}=true)")
        return
    repeat = convert is None and get_origin(doc.type) is list
    notes = [doc.key]
    if doc.choices:
        notes.append(f"one of {', '.join(map(repr, doc.choices))}")
    if repeat:
        notes.append("repeat the flag for more items")
    elif doc.default is not None:
        notes.append(f"default {doc.default!r}")
    parser.add_argument(
        flag,
        dest=dest,
        type=convert or (_item_type(get_args(doc.type)[0]) if repeat else str),
        metavar=doc.key.upper(),
        action="append" if repeat else "store",
        help=f"{help_text} (= {'; '.join(notes)})",
    )


def _item_type(tp: Any) -> Callable[[str], Any]:
    """How argparse reads an item of a repeatable flag, which reaches the config as a JSON list: numbers as such,
    anything else as text. A single value stays text, which the config reads and checks, naming the flag."""
    return tp if tp in (int, float) else str


def _add_stage(subparsers: argparse._SubParsersAction, stage: Stage) -> None:
    docs = {doc.key: doc for doc in describe_fields(stage.config_cls)}
    parser = subparsers.add_parser(
        stage.command[-1],
        help=stage.help,
        description=stage.help,
        epilog=_config_epilog(list(docs.values())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=not stage.resume_keys, help=stage.out_help)
    if stage.resume_keys:
        parser.add_argument(
            "--resume",
            type=Path,
            metavar="RUN_DIR",
            help="continue the run in RUN_DIR from its newest checkpoint, with its config (only "
            f"{', '.join(stage.resume_keys)} may be changed, e.g. num_rounds=20)",
        )
    for flag, key, *convert in stage.flags:
        _add_flag(parser, flag, docs[key], *convert)
    parser.add_argument("--config", type=Path, help="YAML config file (default: built-in defaults, as in configs/)")
    parser.add_argument("--force", action="store_true", help="replace this stage's earlier outputs in --out")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. seed=3")
    parser.set_defaults(handler=lambda args: _run_stage(args, stage))


def _sugar(stage: Stage, args: argparse.Namespace) -> list[Override]:
    """The KEY=VALUE overrides that the flags given stand for, each naming its flag for the config's messages."""
    out = []
    for flag, key, *_ in stage.flags:
        value = getattr(args, f"flag_{key}")
        if value is not None:
            out.append(Override(f"{key}={value if isinstance(value, str) else json.dumps(value)}", flag))
    return out


def _run_stage(args: argparse.Namespace, stage: Stage) -> int:
    sugar = _sugar(stage, args)
    resume = getattr(args, "resume", None)
    if resume is not None:
        overrides = [*sugar, *map(Override, args.overrides)]
        changed = [o.text.split("=", 1)[0] for o in overrides]
        bad = [k for k in changed if not any(k == r or k.startswith(r + ".") for r in stage.resume_keys)]
        if bad or args.config or (args.out and Path(args.out).resolve() != resume.resolve()):
            raise ConfigError(
                f"--resume continues {resume} with its own config: only {', '.join(stage.resume_keys)} "
                f"may be overridden{f' (not {bad})' if bad else ''}, and no --config or other --out"
            )
        if not (resume / CONFIG_FILE).is_file():
            raise ConfigError(f"{resume} holds no {CONFIG_FILE}: it is not a {stage.name} run folder")
        args.out, args.config, args.overrides = resume, resume / CONFIG_FILE, overrides
    elif args.out is None:
        raise ConfigError("--out is required (or --resume RUN_DIR)")
    cfg = absolute_paths(
        load_config(stage.config_cls, args.config, [*sugar, *args.overrides] if resume is None else args.overrides)
    )
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    module_name, function_name = stage.entry.split(":")
    entry = getattr(importlib.import_module(module_name), function_name)
    with stage_run(
        stage.name, args.out, cfg, force=args.force, owned=stage.owned, resume=resume is not None, command=args.command
    ) as run:
        entry(cfg, args.out, run)
    return 0


def repetitions(text: str) -> list[int]:
    """`--repetitions N` of synth speech-commands: keyword_repetitions [N, N] (named for argparse's messages)."""
    return [int(text)] * 2


def _stages() -> dict[str, Stage]:
    """The stages by name, in the order of `fedhubert --help`."""
    from fedhubert.corpus import librispeech_synth as ls, speech_commands_synth as sc
    from fedhubert.distill import config as distill_config
    from fedhubert.eval import config as eval_config, probe_config
    from fedhubert.labels import config as kmeans_config
    from fedhubert.partition import config as partition_config
    from fedhubert.pretrain import config as pretrain_config
    from fedhubert.train import config as train_config

    hubert_features = (
        ("--features", "features.kind"),
        ("--checkpoint", "features.checkpoint"),
        ("--layer", "features.layer"),
    )
    stages = (
        Stage(
            command=("synth", "librispeech"),
            help="a small LibriSpeech-layout corpus (SPEAKERS.TXT, FLAC, trans.txt)",
            out_help="corpus root to create (it will hold SPEAKERS.TXT and the subset folders)",
            config_cls=ls.LibriSpeechSynthConfig,
            owned=ls.OUTPUTS,
            entry="fedhubert.corpus.librispeech_synth:synthesize_librispeech",
            flags=(("--speakers", "speakers"), ("--minutes", "minutes"), ("--seed", "seed"), ("--workers", "workers")),
        ),
        Stage(
            command=("synth", "speech-commands"),
            help="a small Speech Commands v0.01 with its separate test set, as S3PRL reads it",
            out_help="folder to hold speech_commands_v0.01/ and speech_commands_test_set_v0.01/",
            config_cls=sc.SpeechCommandsSynthConfig,
            owned=sc.OUTPUTS,
            entry="fedhubert.corpus.speech_commands_synth:synthesize_speech_commands",
            flags=(
                ("--speakers", "speakers"),
                ("--test-speakers", "test_speakers"),
                ("--repetitions", "keyword_repetitions", repetitions),
                ("--seed", "seed"),
                ("--workers", "workers"),
            ),
        ),
        Stage(
            command=("partition",),
            help="split a LibriSpeech-layout corpus into speaker-disjoint federated clients",
            out_help="partition folder to create (manifests, partition.json, plots)",
            config_cls=partition_config.PartitionConfig,
            owned=partition_config.OUTPUTS,
            entry="fedhubert.partition.run:run_partition",
            flags=(
                ("--corpus", "corpus"),
                ("--scheme", "scheme"),
                ("--clients", "num_clients"),
                ("--seed", "seed"),
                ("--workers", "workers"),
            ),
        ),
        Stage(
            command=("kmeans",),
            help="MFCC k-means targets (HuBERT iteration 1) for every client, federated or per client",
            out_help="k-means folder to create (labels per client, codebook, kmeans.json)",
            config_cls=kmeans_config.KMeansConfig,
            owned=kmeans_config.OUTPUTS,
            entry="fedhubert.labels.run:run_kmeans",
            flags=(
                ("--partition", "partition"),
                ("--mode", "mode"),
                ("--clusters", "num_clusters"),
                *hubert_features,
                ("--seed", "seed"),
                ("--workers", "workers"),
            ),
            resume_keys=("federation",),
        ),
        Stage(
            command=("features",),
            help="one client's k-means features ahead of 'fedhubert kmeans' (e.g. a Slurm array task per client)",
            out_help="FEATURE_DIR/client_<i>: the cache kmeans reads with feature_dir=FEATURE_DIR",
            config_cls=kmeans_config.ClientFeaturesConfig,
            owned=kmeans_config.FEATURES_OUTPUTS,
            entry="fedhubert.labels.client_features:run_client_features",
            flags=(("--partition", "partition"), ("--client", "client"), *hubert_features, ("--workers", "workers")),
        ),
        Stage(
            command=("train-local",),
            help="centralized HuBERT training on manifests and k-means labels (the baseline)",
            out_help="training folder to create (checkpoints, metrics.jsonl, training.png)",
            config_cls=train_config.TrainLocalConfig,
            owned=train_config.OUTPUTS,
            entry="fedhubert.train.run:run_train_local",
            flags=(
                ("--manifest", "train_manifests"),
                ("--labels", "train_labels"),
                ("--valid-manifest", "valid_manifests"),
                ("--valid-labels", "valid_labels"),
                ("--preset", "model.preset"),
                ("--steps", "steps"),
                ("--seed", "seed"),
            ),
        ),
        Stage(
            command=("pretrain",),
            help="federated HuBERT pretraining on Flower (FedAvg by default; FedAvgM, FedAdam, FedYogi), exact resume",
            out_help="run folder to create (checkpoints, metrics.jsonl, tensorboard, pretrain.png)",
            config_cls=pretrain_config.PretrainConfig,
            owned=pretrain_config.OUTPUTS,
            entry="fedhubert.pretrain.run:run_pretrain",
            flags=(
                ("--partition", "partition"),
                ("--kmeans", "kmeans"),
                ("--rounds", "num_rounds"),
                ("--local-steps", "local_steps"),
                ("--preset", "model.preset"),
                ("--strategy", "strategy.name"),
                ("--seed", "seed"),
            ),
            resume_keys=pretrain_config.PretrainConfig.RESUMABLE,
        ),
        Stage(
            command=("distill",),
            help="federated DistilHuBERT distillation from a frozen pretrained teacher, on Flower",
            out_help="run folder to create (checkpoints, metrics.jsonl, tensorboard, distill.png)",
            config_cls=distill_config.DistillConfig,
            owned=distill_config.OUTPUTS,
            entry="fedhubert.distill.run:run_distill",
            flags=(
                ("--teacher", "teacher"),
                ("--partition", "partition"),
                ("--kmeans", "kmeans"),
                ("--rounds", "num_rounds"),
                ("--local-steps", "local_steps"),
                ("--strategy", "strategy.name"),
                ("--seed", "seed"),
            ),
            resume_keys=distill_config.DistillConfig.RESUMABLE,
        ),
        Stage(
            command=("evaluate", "speech-commands"),
            help="keyword spotting (Speech Commands v0.01) with S3PRL's own run_downstream: "
            "train, then score the dev-best checkpoint on the test set",
            out_help="evaluation folder to create (S3PRL's experiment, result.json; the row is added to "
            "../results.jsonl)",
            config_cls=eval_config.SpeechCommandsConfig,
            owned=eval_config.OUTPUTS,
            entry="fedhubert.eval.speech_commands:run_speech_commands",
            flags=(
                ("--dataset", "dataset"),
                ("--checkpoint", "checkpoint"),
                ("--baseline", "baseline"),
                ("--random-init", "random_init"),
                ("--name", "name"),
                ("--steps", "total_steps"),
                ("--eval-step", "eval_step"),
                ("--device", "device"),
            ),
        ),
        Stage(
            command=("probe",),
            help="linear probe of frozen features: logistic regression on time-pooled hidden states of "
            "keyword clips, scored by speaker-disjoint cross-validation",
            out_help="probe folder to create (probe.json, probe.md)",
            config_cls=probe_config.ProbeConfig,
            owned=probe_config.OUTPUTS,
            entry="fedhubert.eval.probe:run_probe",
            flags=(
                ("--dataset", "dataset"),
                ("--checkpoint", "checkpoints"),
                ("--random-init", "random_init"),
                ("--layer", "layer"),
                ("--threads", "threads"),
            ),
        ),
    )
    return {stage.name: stage for stage in stages}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedhubert",
        description="Federated HuBERT pretraining, distillation and SUPERB evaluation on Flower.",
    )
    parser.add_argument("--version", action="version", version=f"fedhubert {__version__}")
    stages = parser.add_subparsers(title="stages", metavar="STAGE", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for stage in _stages().values():
        subparsers = stages
        if len(stage.command) > 1:
            group = stage.command[0]
            if group not in groups:
                help_text, title, metavar = _GROUPS[group]
                groups[group] = stages.add_parser(group, help=help_text).add_subparsers(
                    title=title, metavar=metavar, required=True
                )
            subparsers = groups[group]
        _add_stage(subparsers, stage)
    report = stages.add_parser(
        "report",
        help="write RUN_DIR/report.md and its plots from a run's files",
        description="Rebuild the Markdown report (and PNG plots) of a run folder from the files its stages wrote.",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the folder holding the stage folders")
    report.set_defaults(handler=_report)
    _add_deployment(stages)
    export = stages.add_parser(
        "export",
        help="convert a checkpoint for S3PRL",
        description="Convert a fedhubert checkpoint into a file S3PRL loads as it is.",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help="a fedhubert checkpoint (.pt)")
    export.add_argument(
        "--format",
        required=True,
        choices=["s3prl-hubert", "s3prl-distiller"],
        help="s3prl-hubert: a HuBERT for S3PRL's hubert_local upstream (-u hubert_local -k FILE); "
        "s3prl-distiller: a distilled student for distiller_local",
    )
    export.add_argument("--out", type=Path, required=True, help="file to write (and FILE.json beside it)")
    export.add_argument("--force", action="store_true", help="replace an existing file")
    export.set_defaults(handler=_export)
    return parser


def _add_deployment(stages: argparse._SubParsersAction) -> None:
    superlink = stages.add_parser(
        "superlink",
        help="run a SuperLink of Flower's deployment engine (TLS, SuperNode authentication)",
        description="Run a SuperLink (Flower's deployment engine) until stopped (SIGTERM, Ctrl-C). Federated stages "
        "use it with federation.superlink=HOST:PORT; SuperNodes join with 'fedhubert supernode'.",
    )
    superlink.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for SuperNodes on other machines (default: 127.0.0.1)",
    )
    superlink.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of its Fleet, Control and Runtime APIs (default: a free one, see --ready-file)",
    )
    superlink.add_argument(
        "--tls",
        type=Path,
        metavar="DIR",
        help="serve TLS with DIR/ca.crt, server.pem and server.key (scripts/make_certificates.sh)",
    )
    superlink.add_argument(
        "--authorized-keys",
        type=Path,
        nargs="+",
        default=[],
        metavar="KEY.pub|DIR",
        help="only SuperNodes holding the private keys of these public keys may join (needs --tls)",
    )
    superlink.add_argument("--flwr-home", type=Path, help="its FLWR_HOME (default: a fresh temporary folder)")
    superlink.add_argument("--log", type=Path, help="write Flower's output to this file (default: the terminal)")
    superlink.add_argument(
        "--ready-file", type=Path, help="write HOST:PORT into this file once it serves (and remove it when it stops)"
    )
    superlink.set_defaults(handler=_superlink)

    supernode = stages.add_parser(
        "supernode",
        help="run a SuperNode serving one client (partition) of a federated run",
        description="Run a Flower SuperNode for client --partition-id of --num-partitions (under srun: SLURM_PROCID "
        "and SLURM_NTASKS) until it is stopped or its SuperLink goes away. The client reads "
        "client_<id>/ of the partition; the --*-dir flags say where this node keeps its data when "
        "that differs from the paths in the run's config. One long-lived process runs every message the node "
        "receives (model and data caches built once), not a process per message.",
    )
    supernode.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    supernode.add_argument("--partition-id", type=int, help="this client's index (default: $SLURM_PROCID)")
    supernode.add_argument("--num-partitions", type=int, help="number of clients (default: $SLURM_NTASKS)")
    for flag, key, what in (
        ("--partition-dir", "partition-dir", "the partition folder on this node"),
        ("--kmeans-dir", "kmeans-dir", "the k-means folder on this node"),
        ("--work-dir", "work-dir", "where this client writes features and its local head"),
        ("--teacher", "teacher-checkpoint", "distillation: the teacher checkpoint on this node"),
    ):
        supernode.add_argument(flag, dest=f"node_{key}", metavar="PATH", help=f"{what} (node config {key})")
    supernode.add_argument(
        "--root-certificates",
        type=Path,
        metavar="CA",
        help="the CA certificate of a TLS SuperLink (default: an insecure connection)",
    )
    supernode.add_argument(
        "--auth-key",
        type=Path,
        metavar="KEY",
        help="this node's private key (its KEY.pub registered with the SuperLink)",
    )
    supernode.add_argument(
        "--port", type=int, default=0, help="loopback port of this SuperNode's runtime API (default: a free one)"
    )
    supernode.add_argument(
        "--max-wait-time",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="give up when the SuperLink cannot be reached for this long (default: 300)",
    )
    supernode.add_argument("--flwr-home", type=Path, help="its FLWR_HOME (default: a temporary folder, removed after)")
    supernode.add_argument("--log", type=Path, help="write Flower's output to this file (default: the terminal)")
    supernode.set_defaults(handler=_supernode)


def _superlink(args: argparse.Namespace) -> int:
    from fedhubert.fl.runtime.deploy import serve_superlink

    return serve_superlink(
        host=args.host,
        port=args.port,
        tls_dir=args.tls,
        authorized_keys=args.authorized_keys,
        flwr_home=args.flwr_home,
        log_path=args.log,
        ready_file=args.ready_file,
    )


def _supernode(args: argparse.Namespace) -> int:
    from fedhubert.fl.runtime.deploy import serve_supernode

    node_config = {
        key.removeprefix("node_"): str(Path(value).resolve())
        for key, value in vars(args).items()
        if key.startswith("node_") and value is not None
    }
    return serve_supernode(
        superlink=args.superlink,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        node_config=node_config,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        port=args.port,
        flwr_home=args.flwr_home,
        log_path=args.log,
        max_wait_s=args.max_wait_time,
    )


def _export(args: argparse.Namespace) -> int:
    from fedhubert.model.export import export_checkpoint

    record = export_checkpoint(args.checkpoint, args.format, args.out, force=args.force)
    log.info(
        "wrote %s (%s, sha256 %s); load it in S3PRL with: %s",
        args.out,
        record["format"],
        record["sha256"][:12],
        record["load_with"],
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedhubert.report import write_report

    path = write_report(args.run_dir)
    print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may come before or after flags; argparse's positional would take only the first run.
    args, extra = parser.parse_known_args(argv)
    args.command = ["fedhubert", *(sys.argv[1:] if argv is None else argv)]
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    setup_logging()
    try:
        return args.handler(args)
    except StageStopped as err:
        log.warning("%s", err)
        return EXIT_STOPPED
    except FedhubertError as err:
        log.error("%s", err)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        log.error(
            "cannot write %s: %s. Files already written are intact (every write is atomic): free space or "
            "choose another --out, then run the command again",
            err.filename or "an output",
            err.strerror,
        )
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
