"""Offline Dataflow dry run of the DELG job: builds the job run_dataflow.sh would submit and reports it.

Used by `DRY_RUN=1 ./run_dataflow.sh` (never imported by the job). It runs the job's own entry point,
`beam_job.cli.run(argv)`, with Beam's `--dry_run=True`: DataflowRunner builds the whole pipeline, builds
the `setup.py` sdist, translates to the portable proto and resolves options, then returns without any
GCP contact. From the PipelineResult (`result.job`: options + portable pipeline) this script derives the
Dataflow `Environment` request (worker pool: machine type, container image, harness threads, service
options such as the GPU) exactly as Beam's API client would build it, with no staged packages.

Output: a summary on stderr and, when DRY_RUN_REPORT=path is set, the report as JSON:
  job_name, options (non-default resolved pipeline options), environment (Dataflow Environment proto as
  JSON, minus the bulky pipeline options and capability lists), container_images, staged_artifacts
  ({staged name: local file}), setup_package_members (files inside the sdist built from setup.py),
  transforms (number of transforms in the portable pipeline) and transform_names (names of the top-level transforms).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tarfile
from typing import Any

_LOGGER = logging.getLogger("dataflow.dry_run")


def build_report(result) -> dict[str, Any]:
    """The job Dataflow would receive, from the PipelineResult of a `--dry_run=True` DataflowRunner run."""
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2
    from apache_beam.runners.dataflow.internal import apiclient
    from google.protobuf import json_format

    job = result.job
    proto = job.proto_pipeline
    options = job.options.get_all_options(drop_default=True)
    environment = apiclient.Environment(
        packages=[],
        options=job.options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=(job.options.get_all_options()["staging_location"] or "gs://dry-run")
        + "/pipeline.pb",
        proto_pipeline=proto,
    ).proto
    env_json = json.loads(json_format.MessageToJson(environment._pb))
    env_json.pop("sdkPipelineOptions", None)
    for pool in env_json.get("workerPools", []):
        for image in pool.get("sdkHarnessContainerImages", []):
            image.pop("capabilities", None)

    images, artifacts, members = [], {}, []
    for env in proto.components.environments.values():
        if env.urn == common_urns.environments.DOCKER.urn:
            images.append(beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image)
        for dep in env.dependencies:
            staged = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
            local = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
            artifacts[staged] = local
            if staged == "workflow.tar.gz" and os.path.exists(local):  # the sdist built from --setup_file
                with tarfile.open(local) as tar:
                    members = sorted(name.split("/", 1)[1] for name in tar.getnames() if "/" in name)
    root = proto.components.transforms
    top = list(proto.root_transform_ids)
    while len(top) == 1 and root[top[0]].subtransforms:  # Beam wraps the user's transforms in one root
        top = list(root[top[0]].subtransforms)
    return {
        "job_name": options.get("job_name"),
        "options": options,
        "environment": env_json,
        "container_images": sorted(set(images)),
        "staged_artifacts": artifacts,
        "setup_package_members": members,
        "transforms": len(root),
        "transform_names": [root[t].unique_name for t in top],
    }


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "--dry_run=True" not in argv:
        raise SystemExit("dataflow/dry_run.py only runs Beam dry runs: pass --dry_run=True (run_dataflow.sh does)")
    from beam_job.cli import PROG, exit_status, run

    try:
        outcome = run(argv)
    except BaseException as exc:
        ended = exit_status(exc)  # the job's own ends, with the status and line `delg-extract` gives them
        if ended is None and isinstance(exc, ValueError):  # Beam's option validation, e.g. "Invalid Project ID"
            ended = 2, f"{PROG}: error: {' '.join(str(exc).split())}"
        if ended is None:
            raise
        print(ended[1], file=sys.stderr)
        return ended[0]
    result = getattr(outcome, "result", None)
    if getattr(result, "job", None) is None:
        raise SystemExit("dry run: the job never reached DataflowRunner (is --runner=DataflowRunner passed?)")
    report = build_report(result)
    pool = (report["environment"].get("workerPools") or [{}])[0]
    _LOGGER.info(
        "dry run OK: job %s, %d transforms, machine %s, image %s, harness threads %s, service options %s, "
        "setup package %s (%d files)",
        report["job_name"],
        report["transforms"],
        pool.get("machineType"),
        ", ".join(report["container_images"]),
        pool.get("numThreadsPerWorker"),
        report["environment"].get("serviceOptions", []),
        os.path.basename(report["staged_artifacts"].get("workflow.tar.gz", "NONE")),
        len(report["setup_package_members"]),
    )
    path = os.environ.get("DRY_RUN_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1, sort_keys=True, default=str)
        _LOGGER.info("dry run report written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
