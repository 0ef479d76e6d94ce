"""The Kubernetes backend: a Kubeflow training job, applied with kubectl and followed to its end.

Two APIs:

* ``trainjob`` (default): a Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1)
  on a ``ClusterTrainingRuntime`` such as ``torch-distributed``. The runtime's torch plugin
  sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT,
  which ``torchrun`` reads. Gang scheduling comes from Kueue: the
  ``kueue.x-k8s.io/queue-name`` label makes Kueue admit all ``numNodes`` pods as one
  workload or none of them (the runtime's own ``podGroupPolicy`` is the cluster admin's
  alternative). Volumes go in ``podTemplateOverrides``, the field of Trainer v2.0-v2.2
  (later releases rename it ``runtimePatches``).
* ``pytorchjob``: a Kubeflow Training Operator v1 ``PyTorchJob`` (kubeflow.org/v1) with one
  Master and N-1 Workers and no ``elasticPolicy``; the operator sets the same PET_*
  variables from ``nprocPerNode``. Gang scheduling comes from Volcano: ``schedulerName:
  volcano`` on the pods and ``runPolicy.schedulingPolicy`` (minAvailable = N, queue), from
  which an operator started with ``--gang-scheduler-name=volcano`` creates the PodGroup.

The job name is derived from the run folder, so a retry finds the job it applied before:
a pending or running job is followed again (if it runs the same spec: the digest
annotation), a finished one is deleted and applied anew (training resumes from the run
folder's checkpoint on the shared volume).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from avsiam.launch.jobs import JobStatus, follow
from avsiam.launch.local import ENTRY_MODULE
from avsiam.launch.runner import CommandRunner, SubprocessRunner
from avsiam.launch.spec import LaunchSpec, digest_of, job_name_for

K8S_APIS = ("trainjob", "pytorchjob")
RESOURCE = {"trainjob": "trainjobs.trainer.kubeflow.org", "pytorchjob": "pytorchjobs.kubeflow.org"}
DIGEST_ANNOTATION = "avsiam.io/spec-sha256"
# torchrun takes --nnodes, --nproc_per_node, --node_rank and the master from PET_* variables.
TORCHRUN = ("torchrun", "--module", ENTRY_MODULE)
LABELS = {"app.kubernetes.io/name": "avsiam", "app.kubernetes.io/component": "training"}
# Conditions that end a job: TrainJob reports Complete/Failed, PyTorchJob Succeeded/Failed.
FINAL_CONDITIONS = {"Complete": 0, "Succeeded": 0, "Failed": 1}
# What a job reads from its credentials Secret, each key optional: S3 access for the shards and
# checkpoints, MLflow's login. Never written into a manifest.
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
                   "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class _Dumper(yaml.SafeDumper):
    """Writes repeated objects out in full: no &id001 anchors in a manifest people read."""

    def ignore_aliases(self, data) -> bool:
        return True


def to_yaml(manifest: Mapping[str, Any]) -> str:
    return yaml.dump(dict(manifest), Dumper=_Dumper, sort_keys=False, width=120)


def _default_volumes() -> dict[str, str]:
    return {"avsiam-cache": "/data", "avsiam-runs": "/runs"}


def job_status(obj: Mapping[str, Any]) -> JobStatus:
    """The state of a TrainJob or PyTorchJob from its status conditions."""
    true = [c["type"] for c in obj.get("status", {}).get("conditions", []) if c.get("status") == "True"]
    for condition, code in FINAL_CONDITIONS.items():
        if condition in true:
            return JobStatus(condition, False, code)
    return JobStatus(true[-1] if true else "Pending", True)


@dataclass(frozen=True)
class KubernetesBackend:
    k8s_api: str = "trainjob"
    namespace: str = "avsiam"
    image: str = "avsiam:cu126"
    runtime: str = "torch-distributed"  # the ClusterTrainingRuntime of a TrainJob
    queue: str = "avsiam"  # Kueue LocalQueue (trainjob) or Volcano queue (pytorchjob)
    job_name: str | None = None  # default: derived from the run folder
    pvc: Mapping[str, str] = field(default_factory=_default_volumes)  # claim -> mount path (shared, RWX)
    cpu: str | None = None  # requests per node, e.g. "64"
    memory: str | None = None  # requests per node, e.g. "480Gi"
    credentials_secret: str | None = None  # a Secret holding CREDENTIAL_KEYS (any of them)
    poll_interval_s: float = 30.0
    runner: CommandRunner = field(default_factory=SubprocessRunner)

    def __post_init__(self) -> None:
        if self.k8s_api not in K8S_APIS:
            raise ValueError(f"--k8s-api {self.k8s_api!r}: choose one of {', '.join(K8S_APIS)}")

    # -- the manifest ----------------------------------------------------------------------

    def name_for(self, spec: LaunchSpec) -> str:
        return self.job_name or job_name_for(spec.run_folder("kubernetes"))

    def _volumes(self) -> list[dict[str, Any]]:
        # DataLoader workers pass batches through /dev/shm, which is 64 MiB in a pod by default.
        return [*({"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in self.pvc),
                {"name": "dshm", "emptyDir": {"medium": "Memory"}}]

    def _mounts(self) -> list[dict[str, str]]:
        return [*({"name": claim, "mountPath": path} for claim, path in self.pvc.items()),
                {"name": "dshm", "mountPath": "/dev/shm"}]

    def _env(self, spec: LaunchSpec) -> list[dict[str, Any]]:
        """The spec's variables, then the credentials as references to the Secret."""
        secret = [{"name": key, "valueFrom": {"secretKeyRef": {"name": self.credentials_secret, "key": key, "optional": True}}}
                  for key in CREDENTIAL_KEYS] if self.credentials_secret else []
        return [*({"name": k, "value": v} for k, v in spec.env.items()), *secret]

    def _resources(self, spec: LaunchSpec) -> dict[str, Any]:
        requests = {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory)) if v}
        return {"limits": {"nvidia.com/gpu": spec.gpus_per_node},
                "requests": {**requests, "nvidia.com/gpu": spec.gpus_per_node}}

    def _trainjob(self, spec: LaunchSpec, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name, "namespace": self.namespace,
                         "labels": {**LABELS, "kueue.x-k8s.io/queue-name": self.queue}},
            "spec": {
                "runtimeRef": {"name": self.runtime, "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"},
                "trainer": {
                    "image": self.image, "command": list(TORCHRUN), "args": list(spec.entry_args),
                    "env": self._env(spec),
                    "numNodes": spec.nodes, "numProcPerNode": spec.gpus_per_node, "resourcesPerNode": self._resources(spec),
                },
                "podTemplateOverrides": [{
                    "targetJobs": [{"name": "node"}],
                    "spec": {"volumes": self._volumes(), "containers": [{"name": "node", "volumeMounts": self._mounts()}]},
                }],
            },
        }

    def _replica(self, spec: LaunchSpec, replicas: int) -> dict[str, Any]:
        container = {
            "name": "pytorch",  # the operator looks for this container name
            "image": self.image, "command": list(TORCHRUN), "args": list(spec.entry_args),
            "env": self._env(spec),
            "resources": self._resources(spec), "volumeMounts": self._mounts(),
        }
        # Never restart one pod alone: it cannot rejoin a static rendezvous. A retry of the
        # whole job resumes from the checkpoint instead.
        return {"replicas": replicas, "restartPolicy": "Never",
                "template": {"metadata": {"labels": dict(LABELS)},
                             "spec": {"schedulerName": "volcano", "containers": [container], "volumes": self._volumes()}}}

    def _pytorchjob(self, spec: LaunchSpec, name: str) -> dict[str, Any]:
        replicas = {"Master": self._replica(spec, 1)}
        if spec.nodes > 1:
            replicas["Worker"] = self._replica(spec, spec.nodes - 1)
        return {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": self.namespace, "labels": dict(LABELS)},
            "spec": {
                "nprocPerNode": str(spec.gpus_per_node),
                "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running",
                              "schedulingPolicy": {"minAvailable": spec.nodes, "queue": self.queue}},
                "pytorchReplicaSpecs": replicas,
            },
        }

    def manifest(self, spec: LaunchSpec) -> dict[str, Any]:
        build = self._trainjob if self.k8s_api == "trainjob" else self._pytorchjob
        manifest = build(spec, self.name_for(spec))
        manifest["metadata"]["annotations"] = {DIGEST_ANNOTATION: digest_of(manifest)}
        return manifest

    def render(self, spec: LaunchSpec) -> str:
        return to_yaml(self.manifest(spec))

    # -- talking to the cluster ------------------------------------------------------------

    def _kubectl(self, *args: str, input_text: str | None = None):
        return self.runner.run(["kubectl", *args], input_text=input_text)

    def fetch(self, name: str) -> dict[str, Any] | None:
        """The job object, or None when it does not exist (or kubectl could not say)."""
        got = self._kubectl("get", RESOURCE[self.k8s_api], name, "--namespace", self.namespace, "--output", "json")
        return json.loads(got.stdout) if got.returncode == 0 else None

    def status(self, name: str) -> JobStatus | None:
        obj = self.fetch(name)
        return None if obj is None else job_status(obj)

    def delete(self, name: str, log_line: Callable[[str], None], *, wait: bool) -> None:
        done = self._kubectl("delete", RESOURCE[self.k8s_api], name, "--namespace", self.namespace,
                             "--ignore-not-found", f"--wait={str(wait).lower()}")
        outcome = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()}"
        log_line(f"kubectl delete {name}: {outcome}")

    def apply(self, manifest: Mapping[str, Any], log_line: Callable[[str], None]) -> None:
        done = self._kubectl("apply", "--filename", "-", input_text=to_yaml(manifest))
        if done.returncode != 0:
            raise RuntimeError(f"kubectl apply failed (exit {done.returncode}): {done.stderr.strip()}")
        log_line(done.stdout.strip())

    def _existing_job(self, name: str, digest: str, log_line: Callable[[str], None]) -> bool:
        """True when a job of this name is pending or running with this spec (follow it);
        a finished one is deleted so that the same name can run again."""
        obj = self.fetch(name)
        if obj is None:
            return False
        current = job_status(obj)
        if not current.active:
            log_line(f"{self.k8s_api} {name} exists and ended ({current.state}): replacing it")
            self.delete(name, log_line, wait=True)
            return False
        if obj["metadata"].get("annotations", {}).get(DIGEST_ANNOTATION) != digest:
            raise RuntimeError(f"{self.k8s_api} {name} ({current.state}) runs a different spec; kubectl delete "
                               f"{RESOURCE[self.k8s_api]} {name} -n {self.namespace} first, or use another output folder")
        log_line(f"re-attaching to {self.k8s_api} {name} ({current.state})")
        return True

    # -- the backend -----------------------------------------------------------------------

    def run(self, spec: LaunchSpec, *, log_line: Callable[[str], None] = print, wall_clock_limit_s: float | None = None) -> int:
        manifest = self.manifest(spec)
        name = manifest["metadata"]["name"]
        if not self._existing_job(name, manifest["metadata"]["annotations"][DIGEST_ANNOTATION], log_line):
            self.apply(manifest, log_line)
        return follow(
            f"{self.k8s_api} {name}", lambda: self.status(name), lambda: self.delete(name, log_line, wait=False),
            log_line=log_line, poll_interval_s=self.poll_interval_s, wall_clock_limit_s=wall_clock_limit_s,
        )
