"""Boot of a Python SDK worker for Beam's PROCESS environment, in Python: what Beam's Go `boot` binary does.

A portable runner (Flink, Spark) started with `--environment_type=PROCESS
--environment_config='{"command": "<executable>"}'` runs `<executable> --id=<worker id>
--provision_endpoint=<host:port> [--semi_persist_dir=<dir>]` for every SDK worker it needs, as a child of the
TaskManager. Beam's own executable for that is the Go boot program of its container images, which no package
registry ships; this module does its part for an environment where the job's packages are already installed
(as they are on our workers): ask the provision service for the pipeline options and the runner's endpoints,
put them where `sdk_worker_main` reads them, and become that worker. Artifacts are not staged (nothing to
install). scripts/flink_cluster.py writes the executable: `exec <python> -m beam_job.pipeline.worker_boot "$@"`.

Why not the EXTERNAL worker pool: every TaskManager numbers its workers from 1 ("1-1", "2-1", ...), so
TaskManagers sharing one pool stop each other's workers by id (docs/flink.md). PROCESS workers belong to
their TaskManager: their ids never meet, and a lost TaskManager takes its workers with it.
"""

from __future__ import annotations

import argparse
import os
import sys


def worker_environment(worker_id: str, provision_endpoint: str, semi_persist_dir: str | None) -> dict[str, str]:
    """The variables `apache_beam.runners.worker.sdk_worker_main` reads, from the runner's provision service."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc
    from google.protobuf import json_format, text_format

    with grpc.insecure_channel(provision_endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        info = stub.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(),
                                     metadata=[("worker_id", worker_id)], timeout=60).info
    env = {
        "WORKER_ID": worker_id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
        "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(info.control_endpoint),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),
    }
    if info.HasField("logging_endpoint"):
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.logging_endpoint)
    if info.HasField("status_endpoint"):
        env["STATUS_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.status_endpoint)
    if semi_persist_dir:
        env["SEMI_PERSISTENT_DIRECTORY"] = semi_persist_dir
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="worker_boot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", required=True, help="the worker id the runner assigned")
    parser.add_argument("--provision_endpoint", required=True, help="host:port of the runner's provision service")
    parser.add_argument("--semi_persist_dir", default=None)
    args, _ = parser.parse_known_args(argv)  # later runners may pass endpoints the provision info repeats
    env = dict(os.environ, **worker_environment(args.id, args.provision_endpoint, args.semi_persist_dir))
    command = [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"]
    os.execve(sys.executable, command, env)  # become the worker: the runner watches and stops this pid


if __name__ == "__main__":
    main()
