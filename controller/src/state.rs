//! The `d8-system/registry-state` secret: keys `conditions`, `hash`, `mode`, `state`,
//! `target_mode`, readable by the documented status command
//! `yq '.data | del .state | map_values(@base64d) | .conditions = (.conditions | from_yaml)'`.
//! `state` carries fingerprints instead of credentials and keys.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde::{Deserialize, Serialize};

use crate::conditions::Conditions;
use crate::config::{CheckMode, UpstreamParams};
use crate::consts::*;
use crate::render::owner_labels;
use crate::{Error, Result, sha256_hex};

/// Upstream parameters without secrets: passwords and CAs appear as short SHA-256 fingerprints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedactedParams {
    /// `host[/path]`.
    pub images_repo: String,
    /// `HTTP` / `HTTPS`.
    pub scheme: String,
    /// Upstream user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// First 16 hex digits of sha256(password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_fingerprint: Option<String>,
    /// First 16 hex digits of sha256(CA PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// `Default` / `Relax`.
    pub check_mode: String,
}

/// 16-hex-digit SHA-256 prefix: enough to see a change, useless to recover a license key.
pub fn fingerprint(s: &str) -> String {
    sha256_hex(s.as_bytes())[..16].to_string()
}

impl From<&UpstreamParams> for RedactedParams {
    fn from(p: &UpstreamParams) -> Self {
        RedactedParams {
            images_repo: p.images_repo(),
            scheme: p.scheme.as_upper().to_string(),
            username: p.username.clone(),
            password_fingerprint: p.password.as_deref().map(fingerprint),
            ca_fingerprint: p.ca.as_deref().map(fingerprint),
            check_mode: p.check_mode.as_str().to_string(),
        }
    }
}

/// Last checker outcome, cached by version so steady reconciles do not re-check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckerRecord {
    /// sha256 of (params, target mode, check mode).
    pub version: String,
    /// All items checked.
    pub ready: bool,
    /// The condition message.
    pub message: String,
}

/// The decoded `state` key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDoc {
    /// Current mode (`Unmanaged` when empty).
    #[serde(default)]
    pub mode: String,
    /// Requested mode.
    #[serde(default)]
    pub target_mode: String,
    /// `""` or `incluster-proxy`.
    #[serde(default)]
    pub registry_service: String,
    /// Mode nodes and `deckhouse-registry` currently serve (set when a switch completes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub actual_mode: String,
    /// Parameters nodes and `deckhouse-registry` currently serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_params: Option<RedactedParams>,
    /// Parameters being switched to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_params: Option<RedactedParams>,
    /// Checker cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checker: Option<CheckerRecord>,
    /// Expected proxy config version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub in_cluster_proxy_version: String,
    /// Conditions (also published under their own key).
    #[serde(default)]
    pub conditions: Conditions,
}

impl StateDoc {
    /// Current mode with the documented default.
    pub fn mode_or_default(&self) -> &str {
        if self.mode.is_empty() {
            "Unmanaged"
        } else {
            &self.mode
        }
    }
}

/// Checker version: sha256 of the params, target mode and check mode.
pub fn checker_version(p: &UpstreamParams, target_mode: &str, check_mode: CheckMode) -> String {
    let j = serde_json::json!({"params": p, "target_mode": target_mode, "check_mode": check_mode.as_str()});
    sha256_hex(j.to_string().as_bytes())
}

fn yaml<T: Serialize>(what: &str, v: &T) -> Result<String> {
    serde_saphyr::to_string(v).map_err(|e| Error::Encode {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Builds the `registry-state` Secret.
pub fn to_secret(doc: &StateDoc, hash: &str) -> Result<Secret> {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        data.insert(k.to_string(), ByteString(v.into_bytes()));
    };
    put("conditions", yaml("conditions", &doc.conditions)?);
    put("hash", hash.to_string());
    put("mode", doc.mode_or_default().to_string());
    put("target_mode", doc.target_mode.clone());
    put("state", yaml("state", doc)?);
    let mut s: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": STATE_SECRET, "namespace": NAMESPACE, "labels": owner_labels(),
                     "annotations": {CONFIG_HASH_ANNOTATION: hash}},
        "type": "registry/state",
    }))
    .map_err(|e| Error::Encode {
        what: STATE_SECRET.into(),
        reason: e.to_string(),
    })?;
    s.data = Some(data);
    Ok(s)
}

/// Decodes the `state` key (a missing secret or key is the empty state).
pub fn from_secret(s: Option<&Secret>) -> Result<StateDoc> {
    let Some(raw) = s.and_then(|s| s.data.as_ref()).and_then(|d| d.get("state")) else {
        return Ok(StateDoc::default());
    };
    serde_saphyr::from_slice(&raw.0).map_err(|e| Error::Decode {
        what: "registry-state.state".into(),
        reason: e.to_string(),
    })
}

/// What the documented status command prints for this secret.
pub fn status_output(s: &Secret) -> Result<String> {
    let mut out: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for (k, v) in s.data.iter().flatten() {
        if k == "state" {
            continue;
        }
        let text = String::from_utf8_lossy(&v.0).into_owned();
        let value = if k == "conditions" {
            serde_saphyr::from_str::<serde_json::Value>(&text).map_err(|e| Error::Decode {
                what: "registry-state.conditions".into(),
                reason: e.to_string(),
            })?
        } else {
            serde_json::Value::String(text)
        };
        out.insert(k.clone(), value);
    }
    // yq indents sequences under keys; match its layout.
    let mut opts = serde_saphyr::SerializerOptions::default();
    opts.compact_list_indent = false;
    serde_saphyr::to_string_with_options(&out, opts).map_err(|e| Error::Encode {
        what: "status".into(),
        reason: e.to_string(),
    })
}

/// Parses `kubectl get secret -o yaml|json` output.
pub fn secret_from_text(text: &str) -> Result<Secret> {
    serde_saphyr::from_str(text).map_err(|e| Error::Decode {
        what: "secret file".into(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::types;
    use crate::config::Scheme;

    fn params() -> UpstreamParams {
        UpstreamParams {
            host: "registry.deckhouse.io".into(),
            path: "deckhouse/ee".into(),
            scheme: Scheme::Https,
            username: Some("license-token".into()),
            password: Some("SECRET-LICENSE-KEY".into()),
            ca: None,
            check_mode: CheckMode::Default,
        }
    }

    #[test]
    fn secret_round_trip_and_no_plaintext_credentials() {
        let mut doc = StateDoc {
            mode: "Direct".into(),
            target_mode: "Direct".into(),
            registry_service: "incluster-proxy".into(),
            actual_params: Some((&params()).into()),
            ..Default::default()
        };
        doc.conditions
            .set_true(types::READY, 2, "2026-01-15T10:00:00Z");
        let s = to_secret(&doc, "abc").unwrap();
        let data = s.data.as_ref().unwrap();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, ["conditions", "hash", "mode", "state", "target_mode"]);
        for v in data.values() {
            assert!(!String::from_utf8_lossy(&v.0).contains("SECRET-LICENSE-KEY"));
        }
        assert_eq!(from_secret(Some(&s)).unwrap(), doc);
        assert_eq!(from_secret(None).unwrap(), StateDoc::default());
        assert_eq!(s.type_.as_deref(), Some("registry/state"));
    }

    #[test]
    fn status_output_is_the_yq_view() {
        let mut doc = StateDoc {
            mode: "Unmanaged".into(),
            target_mode: "Direct".into(),
            ..Default::default()
        };
        doc.conditions.set_processing(
            types::READY,
            "Transitioning to Direct",
            1,
            "2026-01-15T10:00:00Z",
        );
        let s = to_secret(&doc, "h1").unwrap();
        // Through kubectl's YAML (base64 data) and back.
        let text = serde_saphyr::to_string(&s).unwrap();
        let s2 = secret_from_text(&text).unwrap();
        let out = status_output(&s2).unwrap();
        assert!(!out.contains("state:"), "{out}");
        assert!(out.contains("hash: h1"), "{out}");
        assert!(out.contains("target_mode: Direct"), "{out}");
        assert!(out.contains("type: Ready"), "{out}");
        assert!(out.contains("message: Transitioning to Direct"), "{out}");
        let v: serde_json::Value = serde_saphyr::from_str(&out).unwrap();
        assert_eq!(v["conditions"][0]["reason"], "Processing");
        assert_eq!(v["mode"], "Unmanaged");
    }
}
