//! The `hosts.toml` files derived from the bashible config: DKP's `registry.d` and stock
//! containerd's `certs.d`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::bashible::BashibleConfig;
use crate::consts::*;

/// One file for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFile {
    /// Absolute path on the node.
    pub path: String,
    /// Content.
    pub content: String,
}

/// TOML basic string with escapes.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Root of Deckhouse's patched containerd host directories.
pub const DKP_HOSTS_DIR: &str = "/etc/containerd/registry.d";
/// Stock containerd's conventional `config_path`.
pub const STOCK_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// `hosts.toml` (and CA files) in Deckhouse's patched format (§2.2), one per host directory.
pub fn dkp_hosts_toml(cfg: &BashibleConfig) -> Vec<NodeFile> {
    let mut files = Vec::new();
    for (dir, hm) in &cfg.hosts {
        let base = format!("{DKP_HOSTS_DIR}/{dir}");
        let mut t = String::from("[host]\n");
        for m in &hm.mirrors {
            let url = format!("{}://{}", m.scheme, m.host);
            let key = format!("host.{}", toml_str(&url));
            t.push_str(&format!("  [{key}]\n"));
            t.push_str("    capabilities = [\"pull\", \"resolve\"]\n");
            if m.scheme == "http" {
                t.push_str("    skip_verify = true\n");
            }
            if !m.ca.is_empty() {
                let ca_path = format!("{base}/{}-{}-ca.crt", m.scheme, m.host);
                t.push_str(&format!("    ca = [{}]\n", toml_str(&ca_path)));
                files.push(NodeFile {
                    path: ca_path,
                    content: m.ca.clone(),
                });
            }
            if let Some(a) = &m.auth {
                t.push_str(&format!("    [{key}.auth]\n"));
                t.push_str(&format!("      username = {}\n", toml_str(&a.username)));
                t.push_str(&format!("      password = {}\n", toml_str(&a.password)));
            }
            for r in &m.rewrites {
                t.push_str(&format!("    [[{key}.rewrite]]\n"));
                t.push_str(&format!("      regex = {}\n", toml_str(&r.from)));
                t.push_str(&format!("      replace = {}\n", toml_str(&r.to)));
            }
        }
        files.push(NodeFile {
            path: format!("{base}/hosts.toml"),
            content: t,
        });
    }
    files.sort_by(|a, b| {
        b.path
            .ends_with("hosts.toml")
            .cmp(&a.path.ends_with("hosts.toml"))
    });
    files
}

/// The opt-in stock-containerd path: pulls of `registry.d8-system.svc:5001/...` go to the proxy
/// itself through the `registry` Service's ClusterIP (node DNS cannot resolve `.svc`, but
/// kube-proxy/Cilium route ClusterIPs from the host network), verified with our CA, with Basic
/// credentials sent as a header because stock containerd has no `auth` key in `hosts.toml`.
pub fn stock_hosts_toml(
    cluster_ip: &str,
    ca_pem: &str,
    creds: Option<(&str, &str)>,
) -> Vec<NodeFile> {
    let base = format!("{STOCK_HOSTS_DIR}/{REGISTRY_HOST}");
    let ca_path = format!("{base}/registry-ca.crt");
    let url = format!("https://{cluster_ip}:{REGISTRY_PORT}");
    let key = format!("host.{}", toml_str(&url));
    let mut t = String::new();
    t.push_str(&format!(
        "server = {}\n\n",
        toml_str(&format!("https://{REGISTRY_HOST}"))
    ));
    t.push_str(&format!("[{key}]\n"));
    t.push_str("  capabilities = [\"pull\", \"resolve\"]\n");
    t.push_str(&format!("  ca = {}\n", toml_str(&ca_path)));
    if let Some((u, p)) = creds {
        t.push_str(&format!("  [{key}.header]\n"));
        t.push_str(&format!(
            "    Authorization = [{}]\n",
            toml_str(&format!("Basic {}", B64.encode(format!("{u}:{p}"))))
        ));
    }
    vec![
        NodeFile {
            path: format!("{base}/hosts.toml"),
            content: t,
        },
        NodeFile {
            path: ca_path,
            content: ca_pem.to_string(),
        },
    ]
}

/// Prints node files as `# <path>` blocks.
pub fn format_node_files(files: &[NodeFile]) -> String {
    let mut out = String::new();
    for f in files {
        out.push_str(&format!("# {}\n{}", f.path, f.content));
        if !f.content.ends_with('\n') {
            out.push('\n');
        }
        out.push('\n');
    }
    out
}
