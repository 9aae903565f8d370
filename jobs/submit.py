"""``lance submit``: run a job on a Ray cluster through the Job Submission API, and manage submitted jobs.

    lance submit <precompute|train|grpo|tune> --config FILE [--address http://HOST:8265] [-- JOB ARGS]
    lance submit status|stop|logs <submission id> [--address ...]
    lance submit list [--address ...]

The address defaults to $RAY_API_SERVER_ADDRESS, then an http $RAY_ADDRESS, then http://127.0.0.1:8265.
On a cluster with token authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.cli import add_log_level_option, setup_logging

JOBS = ("precompute", "train", "grpo", "tune")
"""The jobs that can be submitted (``pipelines.submit.JOBS``, named here so that ``--help`` imports nothing)."""
ADDRESS_HELP = "Ray job API, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or local)"
log = logging.getLogger("lance.submit")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lance submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_log_level_option(parser)
    sub = parser.add_subparsers(dest="action", required=True, metavar="<job or action>")
    for job in JOBS:
        p = sub.add_parser(job, help=f"submit python -m jobs.{job}")
        p.add_argument("--config", help="job config (YAML) or the name of a shipped config; a local path "
                                        "travels with the job")
        p.add_argument("--address", help=ADDRESS_HELP)
        p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="environment variable for the job (repeatable; no credentials)")
        p.add_argument("--submission-id", help="id to give the job (default: lance-<job>-<time>-<random>)")
        p.add_argument("--entrypoint-num-cpus", type=float, default=0.0)
        p.add_argument("--entrypoint-num-gpus", type=float, default=0.0)
        p.add_argument("--entrypoint-resources", default="{}", help='JSON, e.g. \'{"cpu_node": 1}\'')
        p.add_argument("--no-wait", action="store_true", help="print the submission id and return")
        p.add_argument("--allow-secret-files", action="store_true",
                       help="submit although the project holds credential-like files (.env, *.pem, .aws/, ...); "
                            "they are left out of the upload either way")
    for action, help_ in (("status", "status of a submitted job"), ("stop", "stop a submitted job"),
                          ("logs", "logs of a submitted job")):
        p = sub.add_parser(action, help=help_)
        p.add_argument("submission_id")
        p.add_argument("--address", help=ADDRESS_HELP)
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    p = sub.add_parser("list", help="jobs submitted to the cluster")
    p.add_argument("--address", help=ADDRESS_HELP)
    return parser


def _submit(args: argparse.Namespace, job_args: list[str]) -> int:
    from jobs.config_io import resolve_config
    from lance_core.config import ConfigError, load_config
    from pipelines.submit import SubmitOptions, follow, local_data_paths, submit

    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(env) != len(args.env):
        raise ConfigError("submit.env (--env): give NAME=VALUE")
    try:
        resources = json.loads(args.entrypoint_resources)
    except json.JSONDecodeError as err:
        raise ConfigError(f"submit.entrypoint_resources (--entrypoint-resources): not JSON: {err}") from None
    config = None if args.config is None else str(resolve_config(args.config))
    opts = load_config(SubmitOptions, {
        "job": args.action, "config": config, "job_args": job_args, "address": args.address, "env": env,
        "submission_id": args.submission_id, "entrypoint_num_cpus": args.entrypoint_num_cpus,
        "entrypoint_num_gpus": args.entrypoint_num_gpus, "entrypoint_resources": resources,
        "allow_secret_files": args.allow_secret_files}, prefix="submit",
        flags={"config": "--config", "address": "--address", "env": "--env", "submission_id": "--submission-id",
               "entrypoint_num_cpus": "--entrypoint-num-cpus", "entrypoint_num_gpus": "--entrypoint-num-gpus",
               "entrypoint_resources": "--entrypoint-resources"})
    for path in local_data_paths(opts.job_args):
        log.warning(f"{path} is a local path; every node must see it (use s3:// on a cluster)")
    submission_id = submit(opts)
    print(f"submitted {submission_id} to {opts.address}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow(opts.address, submission_id)
    except KeyboardInterrupt:
        log.warning(f"the job keeps running; stop it with: lance submit stop {submission_id}")
        return 130
    print(f"{submission_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _manage(args: argparse.Namespace) -> int:
    from pipelines import submit as api

    if args.action == "status":
        print(json.dumps(api.job_status(args.address, args.submission_id), indent=2))
    elif args.action == "stop":
        stopped = api.stop_job(args.address, args.submission_id)
        print(f"{args.submission_id}: {'stop requested' if stopped else 'already finished'}")
    elif args.action == "logs" and args.follow:
        print(f"{args.submission_id}: {api.follow(args.address, args.submission_id)}")
    elif args.action == "logs":
        sys.stdout.write(api.job_logs(args.address, args.submission_id))
    else:
        for row in api.list_jobs(args.address):
            print(f"{row['submission_id']:<40} {row['status']:<10} {row['entrypoint']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    from lance_core.config import ConfigError
    from pipelines.submit import SubmitError, api_errors, default_address

    args.address = args.address or default_address()
    try:
        with api_errors(args.address):
            if args.action in JOBS:
                return _submit(args, job_args)
            if job_args:
                raise ConfigError(f"submit.{args.action}: takes no job arguments after --")
            return _manage(args)
    except (ConfigError, SubmitError) as err:
        print(f"lance submit: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
