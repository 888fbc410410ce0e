//! The node-config DaemonSet: puts the published stock-containerd files
//! (`registry-stock-containerd-hosts`) on every node and does nothing else. It runs the
//! controller's own image (`registry-controller node-files`), so no shell or utility image has
//! to be pulled from anywhere, and it is the only thing on the node that writes under
//! `/etc/containerd/certs.d`.

use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::json;

use super::{from_json, owner_labels};
use crate::Result;
use crate::consts::{NAMESPACE, REGISTRY_HOST, STOCK_HOSTS_SECRET};

/// Name of the DaemonSet.
pub const NODE_CONFIG_NAME: &str = "registry-node-config";
/// Where the host's `certs.d` is mounted in the container.
const HOST_MOUNT: &str = "/host/etc/containerd/certs.d";

/// The DaemonSet writing `<certs.d>/registry.d8-system.svc:5001/{hosts.toml,registry-ca.crt}`
/// on every node, with `image` (the controller's).
///
/// Least privilege: no service account token, no host network or PID namespace, all
/// capabilities dropped, read-only root filesystem. It runs as UID 0 only because
/// `/etc/containerd/certs.d` belongs to root; the one writable host path is that directory.
pub fn node_config_daemonset(image: &str) -> Result<DaemonSet> {
    let labels = owner_labels()
        .into_iter()
        .chain([("app".to_string(), NODE_CONFIG_NAME.to_string())])
        .collect::<std::collections::BTreeMap<_, _>>();
    from_json(
        "node-config daemonset",
        json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": NODE_CONFIG_NAME, "namespace": NAMESPACE, "labels": labels},
            "spec": {
                "selector": {"matchLabels": {"app": NODE_CONFIG_NAME}},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": false,
                        "enableServiceLinks": false,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists"}],
                        "securityContext": {"runAsUser": 0, "runAsGroup": 0,
                                            "seccompProfile": {"type": "RuntimeDefault"}},
                        "containers": [{
                            "name": "node-files",
                            "image": image,
                            "args": ["node-files", "--source", "/source",
                                     "--target", format!("{HOST_MOUNT}/{REGISTRY_HOST}"),
                                     "--interval", "60s"],
                            "resources": {"requests": {"cpu": "5m", "memory": "16Mi"},
                                          "limits": {"memory": "32Mi"}},
                            "securityContext": {"readOnlyRootFilesystem": true,
                                                "allowPrivilegeEscalation": false,
                                                "capabilities": {"drop": ["ALL"]}},
                            "volumeMounts": [
                                {"name": "source", "mountPath": "/source", "readOnly": true},
                                {"name": "certs-d", "mountPath": HOST_MOUNT}
                            ]
                        }],
                        "volumes": [
                            {"name": "source", "secret": {"secretName": STOCK_HOSTS_SECRET, "defaultMode": 0o400}},
                            {"name": "certs-d", "hostPath": {"path": "/etc/containerd/certs.d", "type": "DirectoryOrCreate"}}
                        ]
                    }
                }
            }
        }),
    )
}

/// Copies every file of a mounted Secret (`source`, skipping the kubelet's `..data` links)
/// into `target` when its content differs: written to a temporary name in `target` and
/// renamed, so containerd never reads a half-written `hosts.toml`. The files carry
/// credentials, so they are readable by root only. Returns how many files changed.
pub fn sync_node_files(
    source: &std::path::Path,
    target: &std::path::Path,
) -> std::io::Result<usize> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(target)?;
    let mut changed = 0;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| !n.starts_with('.')) else {
            continue;
        };
        // A Secret key is a plain file name; anything else is not ours to write.
        if name.contains('/') || name.len() > 253 {
            continue;
        }
        let want = std::fs::read(entry.path())?;
        let dst = target.join(name);
        if std::fs::read(&dst).is_ok_and(|have| have == want) {
            continue;
        }
        let tmp = target.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&want)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dst)?;
        changed += 1;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemonset_writes_only_certs_d_with_least_privilege() {
        let ds = serde_json::to_value(node_config_daemonset("reg/controller:1").unwrap()).unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none());
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "reg/controller:1");
        assert_eq!(c["args"][0], "node-files");
        assert_eq!(
            c["args"][4],
            "/host/etc/containerd/certs.d/registry.d8-system.svc:5001"
        );
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert!(c["securityContext"].get("privileged").is_none());
        // Exactly one host path, the containerd certs.d directory, and the Secret read-only.
        let host: Vec<&str> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str())
            .collect();
        assert_eq!(host, ["/etc/containerd/certs.d"]);
        assert_eq!(
            pod["volumes"][0]["secret"]["secretName"],
            STOCK_HOSTS_SECRET
        );
        assert_eq!(c["volumeMounts"][0]["readOnly"], true);
    }

    #[test]
    fn deploy_manifest_matches_render() {
        let text = include_str!("../../../deploy/node-config/daemonset.yaml");
        let file: serde_json::Value = serde_saphyr::from_str(text).unwrap();
        let rendered =
            serde_json::to_value(node_config_daemonset("registry-controller").unwrap()).unwrap();
        assert_eq!(file, rendered);
    }

    #[test]
    fn sync_writes_changed_files_atomically_and_skips_kubelet_links() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("registry.d8-system.svc:5001");
        std::fs::write(src.path().join("hosts.toml"), "server = \"x\"\n").unwrap();
        std::fs::write(src.path().join("registry-ca.crt"), "PEM").unwrap();
        std::fs::create_dir(src.path().join("..data")).unwrap();
        assert_eq!(sync_node_files(src.path(), &target).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(target.join("registry-ca.crt")).unwrap(),
            "PEM"
        );
        assert!(!target.join("..data").exists());
        // Unchanged: nothing written; changed: only that file.
        assert_eq!(sync_node_files(src.path(), &target).unwrap(), 0);
        std::fs::write(src.path().join("registry-ca.crt"), "PEM2").unwrap();
        assert_eq!(sync_node_files(src.path(), &target).unwrap(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(target.join("hosts.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    }
}
