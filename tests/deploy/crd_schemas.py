"""JSON schemas for the custom resources in k8s/components and k8s/kserve, which kubernetes-validate has no schema
for.

Written for this repository from the Prometheus Operator (monitoring.coreos.com/v1), KEDA (keda.sh/v1alpha1) and
KServe (serving.kserve.io: ServingRuntime v1alpha1, InferenceService v1beta1; field names as in KServe's CRDs)
API references. They cover the fields those APIs define at the levels this repository writes, with
`additionalProperties: false` there, so a misspelt or misplaced field fails the same way kubernetes-validate's
strict mode fails it on built-in kinds. Deeper objects that the manifests here do not use (TLS, auth,
relabelings) are accepted as objects without further checks. Where a KServe field is a Kubernetes core type (a
Container, a Volume), the schema here only requires an object and test_deploy_kserve.py validates it with
kubernetes-validate inside a Pod.
"""

from __future__ import annotations

from typing import Any

# The Prometheus Operator's duration format (monitoringv1.Duration).
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {"type": ["integer", "string"]},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "params": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "honorLabels": {"type": "boolean"},
        "honorTimestamps": {"type": "boolean"},
        "trackTimestampsStaleness": {"type": "boolean"},
        "followRedirects": {"type": "boolean"},
        "enableHttp2": {"type": "boolean"},
        "filterRunning": {"type": "boolean"},
        "proxyUrl": {"type": "string"},
        "bearerTokenFile": {"type": "string"},
        "bearerTokenSecret": _OBJECT,
        "authorization": _OBJECT,
        "basicAuth": _OBJECT,
        "oauth2": _OBJECT,
        "tlsConfig": _OBJECT,
        "relabelings": {"type": "array", "items": _OBJECT},
        "metricRelabelings": {"type": "array", "items": _OBJECT},
    },
}

SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector"],
        "properties": {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": {"type": "string"}},
                },
            },
            "endpoints": {"type": "array", "items": _ENDPOINT},
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer", "minimum": 0},
            "targetLimit": {"type": "integer", "minimum": 0},
            "labelLimit": {"type": "integer", "minimum": 0},
            "labelNameLengthLimit": {"type": "integer", "minimum": 0},
            "labelValueLengthLimit": {"type": "integer", "minimum": 0},
            "keepDroppedTargets": {"type": "integer", "minimum": 0},
            "attachMetadata": _OBJECT,
            "scrapeProtocols": {"type": "array", "items": {"type": "string"}},
            "fallbackScrapeProtocol": {"type": "string"},
            "scrapeClass": {"type": "string"},
        },
    },
)

_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "minLength": 1},
        "expr": {"type": ["string", "integer"]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}

PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "query_offset": _DURATION,
                        "limit": {"type": "integer"},
                        "labels": _STRING_MAP,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {"type": "array", "items": _RULE},
                    },
                },
            }
        },
    },
)

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                    "envSourceContainerName": {"type": "string"},
                },
            },
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "advanced": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "additionalProperties": False,
                        # behavior is checked against the Kubernetes HPA schema by the test itself
                        "properties": {"name": {"type": "string"}, "behavior": _OBJECT},
                    },
                    "scalingModifiers": _OBJECT,
                },
            },
            "fallback": {
                "type": "object",
                "additionalProperties": False,
                "required": ["failureReplicas", "replicas"],
                "properties": {
                    "failureReplicas": {"type": "integer", "minimum": 0},
                    "replicas": {"type": "integer", "minimum": 0},
                    "behavior": {"type": "string"},
                },
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string"},
                        "name": {"type": "string"},
                        # KEDA decodes trigger metadata as map[string]string: a bare number is rejected.
                        "metadata": _STRING_MAP,
                        "authenticationRef": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                        },
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                    },
                },
            },
        },
    },
)


def _fields(names: str, **typed: Any) -> dict[str, Any]:
    """Properties for every field name in `names` (an object or anything where no type is given)."""
    return {name: typed.get(name, {}) for name in names.split()}


# ServingRuntimeSpec's fields, as KServe's servingruntimes CRD lists them.
SERVING_RUNTIME = _resource(
    "serving.kserve.io/v1alpha1",
    "ServingRuntime",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["containers"],
        "properties": _fields(
            "affinity annotations builtInAdapter containers disabled grpcDataEndpoint grpcEndpoint hostIPC "
            "httpDataEndpoint imagePullSecrets labels multiModel nodeSelector protocolVersions replicas "
            "resourceClaims schedulerName storageHelper supportedModelFormats tolerations volumes workerSpec",
            annotations=_STRING_MAP,
            labels=_STRING_MAP,
            containers={"type": "array", "minItems": 1, "items": _OBJECT},
            volumes={"type": "array", "items": _OBJECT},
            disabled={"type": "boolean"},
            multiModel={"type": "boolean"},
            protocolVersions={"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
            supportedModelFormats={
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": _fields(
                        "autoSelect name priority version",
                        autoSelect={"type": "boolean"},
                        name={"type": "string"},
                        priority={"type": "integer", "minimum": 1},
                        version={"type": "string"},
                    ),
                },
            },
        ),
    },
)

# The predictor's model: a Container's fields plus these (ModelSpec in KServe's v1beta1 API).
KSERVE_MODEL_FIELDS = "modelFormat protocolVersion runtime runtimeVersion storage storageUri"
_PREDICTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": _fields(
        "activeDeadlineSeconds affinity annotations autoScaling automountServiceAccountToken batcher "
        "canaryTrafficPercent containerConcurrency containers deploymentStrategy dnsConfig dnsPolicy "
        "enableServiceLinks hostAliases hostIPC hostNetwork hostPID hostUsers hostname hostnameOverride huggingface "
        "imagePullSecrets initContainers labels lightgbm logger maxReplicas minReplicas model name nodeName "
        "nodeSelector onnx os overhead paddle pmml preemptionPolicy priority priorityClassName pytorch "
        "readinessGates resourceClaims resources restartPolicy runtimeClassName scaleMetric scaleMetricType "
        "scaleTarget schedulerName schedulingGates securityContext serviceAccount serviceAccountName "
        "setHostnameAsFQDN shareProcessNamespace sklearn storageContainerName storageUris subdomain tensorflow "
        "terminationGracePeriodSeconds timeout tolerations topologySpreadConstraints triton volumes workerSpec "
        "xgboost",
        annotations=_STRING_MAP,
        labels=_STRING_MAP,
        minReplicas={"type": "integer", "minimum": 0},
        maxReplicas={"type": "integer", "minimum": 0},
        scaleMetric={"enum": ["cpu", "memory", "concurrency", "rps"]},
        scaleTarget={"type": "integer", "minimum": 1},
        canaryTrafficPercent={"type": "integer", "minimum": 0, "maximum": 100},
        containerConcurrency={"type": "integer", "minimum": 0},
        timeout={"type": "integer", "minimum": 1},
        model={
            "type": "object",
            "required": ["modelFormat"],
            "properties": {
                "modelFormat": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                },
                "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                "runtime": {"type": "string"},
                "storageUri": {"type": "string", "pattern": "^[a-z0-9+.-]+://"},
            },
        },
    ),
}
INFERENCE_SERVICE = _resource(
    "serving.kserve.io/v1beta1",
    "InferenceService",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["predictor"],
        "properties": _fields("canary explainer predictor transformer", predictor=_PREDICTOR),
    },
)

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
    ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
