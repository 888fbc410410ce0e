//! Names, ports, labels and annotations fixed by the Deckhouse contract (duplicated on purpose in
//! the proxy crate; a test in `tests/` keeps both in agreement).

/// Namespace of every object the controller owns.
pub const NAMESPACE: &str = "d8-system";
/// Virtual registry host in Direct mode.
pub const REGISTRY_HOST: &str = "registry.d8-system.svc:5001";
/// Port of the registry API.
pub const REGISTRY_PORT: i32 = 5001;
/// Port of the proxy's plain-HTTP metrics and health listener.
pub const METRICS_PORT: i32 = 5002;
/// Client-side repository prefix in Direct mode (without leading slash).
pub const PATH_ALIAS: &str = "system/deckhouse";
/// Regex containerd's rewrite uses for the alias.
pub const PATH_REGEXP: &str = "^system/deckhouse";
/// User name that goes with a license key.
pub const LICENSE_USERNAME: &str = "license-token";
/// Default `imagesRepo`.
pub const CE_IMAGES_REPO: &str = "registry.deckhouse.io/deckhouse/ce";

/// Service name and its port name.
pub const SERVICE_NAME: &str = "registry";
/// Proxy Deployment (and PDB) name.
pub const DEPLOYMENT_NAME: &str = "registry-incluster-proxy";
/// Proxy config secret.
pub const PROXY_CONFIG_SECRET: &str = "registry-incluster-proxy-config";
/// State secret.
pub const STATE_SECRET: &str = "registry-state";
/// Secret every DKP component pulls with.
pub const DECKHOUSE_REGISTRY_SECRET: &str = "deckhouse-registry";
/// Node containerd configuration secret read by bashible.
pub const BASHIBLE_SECRET: &str = "registry-bashible-config";
/// CA and token key.
pub const PKI_SECRET: &str = "registry-pki";
/// Credentials currently in use on nodes and in `deckhouse-registry` (kept out of `state`).
pub const ACTUAL_PARAMS_SECRET: &str = "registry-actual-params";
/// Stock-containerd node files (opt-in path).
pub const STOCK_HOSTS_SECRET: &str = "registry-stock-containerd-hosts";
/// Lease used for leader election.
pub const LEASE_NAME: &str = "registry-controller";

/// Server-side-apply field manager.
pub const FIELD_MANAGER: &str = "registry-controller";
/// Owner label put on every applied object.
pub const OWNER_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`OWNER_LABEL`].
pub const OWNER_VALUE: &str = "registry-controller";
/// Module label Deckhouse puts on its objects.
pub const MODULE_LABEL: &str = "module";

/// Config version of the proxy (Deployment and config secret).
pub const VERSION_ANNOTATION: &str = "registry.deckhouse.io/version";
/// Checksum of the rendered config secret, on the Deployment and its pod template.
pub const CHECKSUM_ANNOTATION: &str = "registry.deckhouse.io/config-checksum";
/// Orchestrator change fingerprint on `registry-state`.
pub const CONFIG_HASH_ANNOTATION: &str = "registry.deckhouse.io/config-hash";
/// Leaf certificate NotAfter (RFC 3339) on the config secret, used for renewal.
pub const TLS_NOT_AFTER_ANNOTATION: &str = "registry.deckhouse.io/tls-not-after";
/// Leaf certificate SAN list on the config secret, used for renewal.
pub const TLS_SANS_ANNOTATION: &str = "registry.deckhouse.io/tls-sans";
/// Node label written by bashible: `default`, `custom` or absent.
pub const NODE_CONTAINERD_LABEL: &str = "node.deckhouse.io/containerd-config-registry";
/// Deckhouse leader pod annotation holding the `deckhouse-registry` checksum it runs with.
pub const DECKHOUSE_POD_CHECKSUM_ANNOTATION: &str = "checksum/registry-version";
/// Namespace of [`BOOTSTRAPPED_CONFIGMAP`].
pub const BOOTSTRAPPED_NAMESPACE: &str = "kube-system";
/// ConfigMap Deckhouse creates once the cluster is bootstrapped (the typo is Deckhouse's).
pub const BOOTSTRAPPED_CONFIGMAP: &str = "d8-cluster-is-bootstraped";
/// Label selector of the deckhouse leader pod.
pub const DECKHOUSE_LEADER_SELECTOR: &str = "app=deckhouse,leader=true";
/// Master node label.
pub const MASTER_LABEL: &str = "node-role.kubernetes.io/control-plane";
