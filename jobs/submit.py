"""``lance submit``: run a job on a Ray cluster through the Job Submission API, and manage submitted jobs.

    lance submit <precompute|train|grpo|tune> --config FILE [--address http://HOST:8265] [-- JOB ARGS]
    lance submit <job> --config FILE [--working-dir DIR] [--py-modules PATH ...] [--runtime-env FILE]
    lance submit <job> --config FILE --dry-run      (what would be uploaded, and what not and why)
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
        p.add_argument("--dry-run", action="store_true",
                       help="list the files that would be uploaded (sizes and total) and what is left out and why; "
                            "submit nothing")
        p.add_argument("--allow-secret-files", action="store_true",
                       help="submit although the project holds credential-like files (.env, *.pem, .aws/, ...); "
                            "they are left out of the upload either way")
        p.add_argument("--working-dir", metavar="DIR",
                       help="folder uploaded as the job's working dir (default: the project when lance-train runs "
                            "from a source checkout; none when it is installed, its packages then travel as "
                            "py_modules); checked like the project")
        p.add_argument("--py-modules", action="append", default=[], metavar="PATH",
                       help="a local package folder or .py module (checked like the project), or a URI, for the "
                            "job's py_modules (repeatable)")
        runtime = p.add_mutually_exclusive_group()
        runtime.add_argument("--runtime-env", metavar="FILE",
                             help="runtime env, YAML or JSON, as for ray job submit (pip, env_vars, excludes, ...), "
                                  "merged with what lance submit sets; no credentials")
        runtime.add_argument("--runtime-env-json", metavar="JSON", help="the runtime env inline, as JSON")
    for action, help_ in (("status", "status of a submitted job"), ("stop", "stop a submitted job"),
                          ("logs", "logs of a submitted job")):
        p = sub.add_parser(action, help=help_)
        p.add_argument("submission_id")
        p.add_argument("--address", help=ADDRESS_HELP)
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    p = sub.add_parser("list", help="jobs of the cluster: submitted ones by submission id, others by Ray job id")
    p.add_argument("--address", help=ADDRESS_HELP)
    for p in (parser, *(sub.choices[job] for job in JOBS)):
        _usage_with_job_args(p)
    return parser


def _usage_with_job_args(parser: argparse.ArgumentParser) -> None:
    """End the usage line with ``[-- JOB ARGS ...]``: ``main`` hands what follows ``--`` to the job before
    argparse sees it, so argparse would not show it."""
    usage = parser.format_usage().removeprefix("usage: ").rstrip()
    parser.usage = usage.replace("%", "%%") + " [-- JOB ARGS ...]"


def _submit(args: argparse.Namespace, job_args: list[str]) -> int:
    from jobs.config_io import resolve_config
    from lance_core.config import ConfigError, load_config
    from pipelines.submit import (
        JobArgumentsError,
        SubmitOptions,
        dry_run,
        follow,
        load_runtime_env,
        local_data_paths,
        resolved_job_config,
        submit,
    )

    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(env) != len(args.env):
        raise ConfigError("submit.env (--env): give NAME=VALUE")
    try:
        resources = json.loads(args.entrypoint_resources)
    except json.JSONDecodeError as err:
        raise ConfigError(f"submit.entrypoint_resources (--entrypoint-resources): not JSON: {err}") from None
    config = None if args.config is None else str(resolve_config(args.config))
    runtime_env = load_runtime_env(args.runtime_env, args.runtime_env_json)
    opts = load_config(SubmitOptions, {
        "job": args.action, "config": config, "job_args": job_args, "address": args.address, "env": env,
        "submission_id": args.submission_id, "entrypoint_num_cpus": args.entrypoint_num_cpus,
        "entrypoint_num_gpus": args.entrypoint_num_gpus, "entrypoint_resources": resources,
        "allow_secret_files": args.allow_secret_files, "working_dir": args.working_dir,
        "py_modules": args.py_modules, "runtime_env": runtime_env}, prefix="submit",
        flags={"config": "--config", "address": "--address", "env": "--env", "submission_id": "--submission-id",
               "entrypoint_num_cpus": "--entrypoint-num-cpus", "entrypoint_num_gpus": "--entrypoint-num-gpus",
               "entrypoint_resources": "--entrypoint-resources", "working_dir": "--working-dir",
               "py_modules": "--py-modules", "runtime_env": "--runtime-env"})
    try:
        _, relative = resolved_job_config(opts.job, opts.config, opts.job_args)
    except JobArgumentsError as err:
        print(f"lance submit: nothing submitted: {err}", file=sys.stderr)
        return 2
    for item in relative:
        log.warning(f"{item} is a relative path: on the cluster it resolves inside Ray's temporary copy of the "
                    "working directory, lost when the job ends; give an absolute path every node sees, or s3://")
    for path in local_data_paths(opts.job_args):
        log.warning(f"{path} is a local path; every node must see it (use s3:// on a cluster)")
    if args.dry_run:
        report, refused = dry_run(opts)
        print(report)
        if refused:
            print(f"lance submit: a submission would be refused: {refused}", file=sys.stderr)
        print("nothing submitted (--dry-run)")
        return 1 if refused else 0
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
            print(f"{row['id']:<40} {row['type']:<10} {row['status']:<10} {row['entrypoint']}")
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
