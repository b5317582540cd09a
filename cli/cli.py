"""The `sandhop` command line. Subcommands import their machinery lazily, so `--help` is instant
and the base install (numpy only) can run the ones that need nothing more."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from sandhop import __version__


def _cmd_record(args: argparse.Namespace) -> int:
    from sandhop.datasets.record import record, record_local
    if args.source:
        result = record_local(args.suite, Path(args.source), Path(args.out))
    else:
        result = record(args.suite, Path(args.out), keep=args.keep)
    row = result.manifest_row
    print(f"{row['suite']}: {row['tests']} tests, {row['events']} events in {row['wall_s']} s -> {result.trace}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sandhop.demo import run_demo
    return run_demo(Path(args.out), suite=args.suite, force=args.force, probes=not args.no_probes)


def _cmd_trace_convert(args: argparse.Namespace) -> int:
    import shutil

    from sandhop.datasets import traces
    path = traces.convert_spool(Path(args.spool), Path(args.out))
    shutil.rmtree(args.spool)
    print(f"wrote {path}")
    return 0


def _cmd_trace_summary(args: argparse.Namespace) -> int:
    from sandhop.datasets import traces
    table = traces.read_traces(Path(args.path), suites=args.suite or None)
    print(traces.format_summary(traces.summarise(table)))
    return 0


def _cmd_inject(args: argparse.Namespace) -> int:
    from sandhop.datasets import scenarios
    from sandhop.datasets.card import scenario_table
    from sandhop.datasets.inject import InjectConfig, inject_dir, parse_mix
    if args.list_scenarios:
        print(scenario_table(scenarios.select(args.scenarios)))
        return 0
    if not (args.traces and args.out):
        raise ValueError("--traces DIR and --out DIR are required (or --list-scenarios)")
    config = InjectConfig(scenarios=args.scenarios, rate=args.rate, hard_negative_rate=args.hard_negatives,
                          mix=parse_mix(args.mix), seed=args.seed)
    manifest = inject_dir(Path(args.traces), Path(args.out), config, suites=args.suite or None,
                          progress=sys.stderr.isatty())
    s = manifest["summary"]
    print(f"injected {s['attacked_units']:,} attacks and {s['hard_negative_units']:,} hard negatives into "
          f"{s['units']:,} tests ({s['injected_events']:,} events, {s['malicious_events']:,} malicious) "
          f"-> {args.out} (manifest inject.json)")
    return 0


def _cmd_dataset_build(args: argparse.Namespace) -> int:
    from sandhop.datasets import splits
    cfg = splits.compose(args.overrides)
    root = splits.build(cfg.dataset, args.out, force=args.force, progress=sys.stderr.isatty())
    print(f"dataset {cfg.dataset.name}: {root}")
    print(splits.format_stats(splits.read_manifest(root)))
    return 0


def _cmd_dataset_show(args: argparse.Namespace) -> int:
    from sandhop.datasets import splits
    manifest = splits.read_manifest(Path(args.root))
    print(f"dataset {manifest['name']} (key {manifest['key']}, sandhop {manifest['sandhop']})")
    print(splits.format_stats(manifest))
    return 0


def _cmd_adfa_score(args: argparse.Namespace) -> int:
    from sandhop.agents.adfa_lm import score_folder
    n = score_folder(Path(args.checkpoint), Path(args.data), Path(args.out))
    print(f"scored {n} traces -> {args.out} (file,score; higher = more anomalous)")
    return 0


def _audit_key(args: argparse.Namespace) -> bytes | None:
    """The key named by --key-env; None lets the audit module read SANDHOP_AUDIT_KEY itself."""
    import os
    if args.key_env is None:
        return None
    value = os.environ.get(args.key_env)
    if not value:
        raise ValueError(f"--key-env {args.key_env}: that environment variable is not set (or is "
                         "empty); export the audit key in it, or drop --key-env for an unkeyed log")
    return value.encode()


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sandhop.agents.evaluate_agent import evaluate_command
    return evaluate_command(policies=args.policies, splits=args.split, out=Path(args.out), dataset=args.dataset,
                            env_overrides=args.env, progress=sys.stderr.isatty())


def _cmd_export(args: argparse.Namespace) -> int:
    from sandhop.agents.export import export, describe
    out = export(args.risk, args.agent, args.out, member=args.member, force=args.force)
    print(describe(out))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import subprocess

    from sandhop.enforcement.runtime import Artifact, ArtifactError
    pytest_args = list(args.pytest_args)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    extra = []
    try:
        Artifact.load(args.artifact)  # fail before pytest starts, with the same message
    except ArtifactError as exc:
        if not args.fallback_tier:
            print(f"sandhop run: {exc}. Nothing was run (fail closed); to run a static tier instead, pass "
                  "--fallback-tier TIER", file=sys.stderr)
            return 2
        extra = [f"--sandhop-fallback-tier={args.fallback_tier}"]
    cmd = [sys.executable, "-m", "pytest", f"--sandhop-enforce={args.artifact}", f"--sandhop-mode={args.mode}",
           *extra, *([f"--sandhop-audit-log={args.audit_log}"] if args.audit_log else []), *pytest_args]
    return subprocess.call(cmd)


def _cmd_learn(args: argparse.Namespace) -> int:
    from sandhop.agents.learn import learn, render
    report = learn(args.logs, args.source, args.out, work=args.work, risk_overrides=args.risk,
                   agent_overrides=args.agent, share=args.share, force=args.force)
    print(render(report))
    print(f"next artifact: {report['out']} (report: {report['out']}/learn_report.md)")
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from sandhop.enforcement import audit
    key = _audit_key(args)
    passed = True
    for log in dict.fromkeys(audit.log_base(p) for p in args.log):
        try:
            report = audit.verify(log, key=key)
        except FileNotFoundError as exc:
            print(f"sandhop audit: {exc}", file=sys.stderr)
            passed = False
            continue
        print(report.format())
        if report.ok and not report.sealed and args.require_seal:
            print(f"  --require-seal: {log} has no seal")
        passed = passed and report.passed(require_seal=args.require_seal)
    return 0 if passed else 1


def _cmd_audit_export(args: argparse.Namespace) -> int:
    from sandhop.enforcement import audit
    logs = list(dict.fromkeys(audit.log_base(p) for p in args.log))
    out = audit.export(logs, Path(args.out), key=_audit_key(args), force=args.force)
    print(f"wrote the decisions of {len(logs)} audit log(s) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandhop", description="Dynamic, learned sandboxing of test execution.")
    parser.add_argument("--version", action="version", version=f"sandhop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job on the bundled data: record a real suite, build the labelled "
                       "splits, train the risk model and the PPO manager, evaluate them against the baselines, "
                       "export the artifact, enforce it on the suite and the live attack probes, write report.md")
    p.add_argument("--out", default="sandhop-demo", help="output folder (default: ./sandhop-demo)")
    p.add_argument("--suite", default="click", help="bundled suite to record and enforce on (default: click)")
    p.add_argument("--force", action="store_true", help="redo every step (default: reuse the ones whose results exist)")
    p.add_argument("--no-probes", action="store_true",
                   help="skip the live attack probes (they need root for their network namespace)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("record", help="download a real suite, run its tests under the recorder, add it to a dataset")
    p.add_argument("suite", metavar="NAME==VERSION")
    p.add_argument("--out", required=True, help="trace dataset folder (Parquet, partitioned by suite)")
    p.add_argument("--keep", action="store_true", help="keep the throwaway venv and sources for inspection")
    p.add_argument("--source", metavar="DIR", help="record a suite already on disk (DIR/tests) with this "
                   "interpreter instead of downloading it, e.g. the bundled web shop: "
                   "--source datasets/webshop webshop==1")
    p.set_defaults(func=_cmd_record)

    p = sub.add_parser("trace", help="inspect and convert traces")
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    q = tsub.add_parser("summary", help="validate a trace dataset (or one file) and print a summary table")
    q.add_argument("path")
    q.add_argument("--suite", action="append", help="only this suite (repeatable)")
    q.set_defaults(func=_cmd_trace_summary)
    q = tsub.add_parser("convert", help="turn a recorder spool left without pyarrow into Parquet")
    q.add_argument("spool")
    q.add_argument("out")
    q.set_defaults(func=_cmd_trace_convert)

    p = sub.add_parser("inject", help="insert attack scenarios into benign traces and label every event")
    p.add_argument("--traces", help="trace dataset folder (or one run file)")
    p.add_argument("--out", help="new folder for the labelled traces and inject.json")
    p.add_argument("--scenarios", default="all",
                   help="all | attacks | benign | ids | family:NAME, comma separated; -X removes (default: all)")
    p.add_argument("--rate", type=float, default=0.2, help="fraction of tests that host an attack (default 0.2)")
    p.add_argument("--hard-negatives", type=float, default=0.1,
                   help="fraction of tests that host a hard negative (default 0.1)")
    p.add_argument("--mix", help="scenario weights, e.g. dns-tunnel=2,family:persistence=0.5 (default: equal)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same dataset (default 0)")
    p.add_argument("--suite", action="append", help="only this suite (repeatable)")
    p.add_argument("--list-scenarios", action="store_true", help="print the scenario table and exit")
    p.set_defaults(func=_cmd_inject)

    p = sub.add_parser("probes", add_help=False,
                       help="run the live attack probes in a private network namespace (root); "
                            "[--record DIR] [--keep] [--report FILE] [-- pytest args]")
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("dataset", help="build and inspect the labelled train/val/test/novel splits")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    q = dsub.add_parser("build", help="build the splits of a dataset config (Hydra overrides, e.g. dataset=small)")
    q.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="e.g. dataset=small dataset.seed=3")
    q.add_argument("--out", help="build folder (default: a cache folder keyed by the config)")
    q.add_argument("--force", action="store_true", help="rebuild even if a build with the same key exists")
    q.set_defaults(func=_cmd_dataset_build)
    q = dsub.add_parser("show", help="print the split statistics of a build folder")
    q.add_argument("root")
    q.set_defaults(func=_cmd_dataset_show)

    p = sub.add_parser("adfa", help="score ADFA-LD-layout system-call traces with a trained risk model")
    asub = p.add_subparsers(dest="adfa_command", metavar="ACTION", required=True)
    q = asub.add_parser("score", help="write file,score for every trace of a folder or zip in ADFA-LD layout")
    q.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                   help="the out= folder of `sandhop-train-risk experiment=adfa_ld`")
    q.add_argument("--data", required=True, metavar="PATH", help="ADFA-LD-layout folder or zip")
    q.add_argument("--out", required=True, metavar="CSV")
    q.set_defaults(func=_cmd_adfa_score)

    p = sub.add_parser("evaluate", help="replay held-out splits through the real engine under sandbox-manager "
                                        "policies (PPO, static tiers, threshold rule, oracle) and compare them")
    p.add_argument("--policies", default="static,threshold,oracle",
                   help="comma list: ppo:RUN_DIR (a sandhop-train-agent run or a multirun folder of them), "
                        "static (every tier) or static:TIER, threshold, oracle (default: %(default)s)")
    p.add_argument("--split", default="test,novel", help="comma list of splits to replay (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for results.parquet, results.md and the Pareto plot")
    p.add_argument("--dataset", default=None,
                   help="dataset config (default: the PPO runs' dataset, else default)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="env setting, e.g. risk.source=model (default: the PPO runs' env config)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write a trained risk model and sandbox manager as a runtime artifact "
                                      "(manifest.json + safetensors) for pytest --sandhop-enforce")
    p.add_argument("--risk", required=True, metavar="RUN_DIR", help="a sandhop-train-risk out= folder")
    p.add_argument("--agent", required=True, metavar="RUN_DIR",
                   help="a sandhop-train-agent out= folder trained on that risk model's scores")
    p.add_argument("--out", required=True, metavar="ARTIFACT_DIR")
    p.add_argument("--member", type=int, default=None,
                   help="which member (seed) of the agent run (default: the best on val)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("run", help="run pytest under an exported artifact: sandhop run ARTIFACT_DIR -- [pytest args]")
    p.add_argument("artifact", metavar="ARTIFACT_DIR")
    p.add_argument("--mode", choices=("enforce", "audit"), default="enforce",
                   help="enforce: deny and fail the test; audit: allow, record what would be denied")
    p.add_argument("--audit-log", metavar="PATH", default=None, help="hash-chained audit log of the run")
    p.add_argument("--fallback-tier", metavar="TIER", default=None,
                   help="if the artifact cannot be used, run this static tier instead (and say so)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="arguments for pytest, after --")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("learn", help="turn audit logs of runs enforced with an artifact into training data, "
                                     "retrain both models from it and export the next artifact with a report")
    p.add_argument("--logs", nargs="+", required=True, metavar="AUDIT_LOG",
                   help="audit logs of runs under pytest --sandhop-enforce (suites and/or the live probes)")
    p.add_argument("--from", dest="source", required=True, metavar="ARTIFACT_DIR", help="the artifact they ran under")
    p.add_argument("--out", required=True, metavar="NEW_ARTIFACT_DIR")
    p.add_argument("--work", metavar="DIR", default=None,
                   help="folder for the new traces and training runs (default: .<out>.work beside --out)")
    p.add_argument("--risk", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the risk retraining config, e.g. train.epochs=2")
    p.add_argument("--agent", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the manager retraining config, e.g. agent.total_timesteps=20000000")
    p.add_argument("--share", type=float, default=0.1,
                   help="share of the training tests the new logs' tests make (their runs are repeated to "
                        "reach it; default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=_cmd_learn)

    p = sub.add_parser("audit", help="verify audit logs of enforced runs, or export their decisions")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    q = asub.add_parser("verify", help="re-walk each log's hash chain; exit 1 on any edit, deletion, "
                                       "reordering or truncation")
    q.add_argument("log", nargs="+", metavar="LOG", help="a log's path (its .N segments and .head are found beside it)")
    q.add_argument("--key-env", metavar="NAME", help="environment variable holding the HMAC key "
                                                     "(default: SANDHOP_AUDIT_KEY, if set)")
    q.add_argument("--require-seal", action="store_true",
                   help="also fail a log whose writer did not close it (killed, crashed)")
    q.set_defaults(func=_cmd_audit_verify)
    q = asub.add_parser("export", help="write the decision records of logs as a trace dataset (Parquet)")
    q.add_argument("log", nargs="+", metavar="LOG")
    q.add_argument("--out", required=True, help="trace dataset folder (Parquet, partitioned by suite)")
    q.add_argument("--key-env", metavar="NAME", help="environment variable holding the HMAC key "
                                                     "(default: SANDHOP_AUDIT_KEY, if set)")
    q.add_argument("--force", action="store_true", help="export even a log whose chain is broken")
    q.set_defaults(func=_cmd_audit_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Our warnings are messages for the user, not for a developer: no source line.
    warnings.formatwarning = lambda message, category, *_a, **_k: f"sandhop: {message}\n"
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["probes"]:  # every argument belongs to the probe harness (argparse cannot pass "--x" on)
        from sandhop.datasets.probe import main as probe_main
        return probe_main(argv[1:])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except ImportError as exc:
        print(f"sandhop {args.command}: needs a package that is not installed ({exc.name}); "
              f"install everything with: pip install -e '.[all]'", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as exc:
        print(f"sandhop {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
