//! The condition list of `registry-state`, with Deckhouse's update rules: setting a condition
//! moves it to the end (so the list ends in pipeline order with `Ready` last), and
//! `lastTransitionTime` changes only when the status flips.

use serde::{Deserialize, Serialize};

/// Condition types (`hooks/orchestrator/const.go`).
pub mod types {
    /// Last condition of every pipeline.
    pub const READY: &str = "Ready";
    /// Step 5 of → Direct.
    pub const IN_CLUSTER_PROXY_READY: &str = "InClusterProxyReady";
    /// Proxy cleanup when leaving Direct.
    pub const CLEANUP_IN_CLUSTER_PROXY: &str = "CleanupInClusterProxy";
    /// Step 2.
    pub const CONTAINERD_CONFIG_PREFLIGHT_READY: &str = "ContainerdConfigPreflightReady";
    /// Step 4.
    pub const TRANSITION_CONTAINERD_CONFIG_READY: &str = "TransitionContainerdConfigReady";
    /// Step 8.
    pub const FINAL_CONTAINERD_CONFIG_READY: &str = "FinalContainerdConfigReady";
    /// Step 7.
    pub const DECKHOUSE_REGISTRY_SWITCH_READY: &str = "DeckhouseRegistrySwitchReady";
    /// Step 1 (the checker).
    pub const REGISTRY_CONTAINS_REQUIRED_IMAGES: &str = "RegistryContainsRequiredImages";
    /// A forbidden mode transition.
    pub const ERR_TRANSITION_NOT_SUPPORTED: &str = "ErrTransitionNotSupported";
    /// Proxy/Local only; kept so that pruning recognises them.
    pub const NODE_SERVICES_READY: &str = "NodeServicesReady";
    /// Proxy/Local only.
    pub const CLEANUP_NODE_SERVICES: &str = "CleanupNodeServices";

    /// Every supported type; others are pruned.
    pub const ALL: &[&str] = &[
        READY,
        NODE_SERVICES_READY,
        CLEANUP_NODE_SERVICES,
        IN_CLUSTER_PROXY_READY,
        CLEANUP_IN_CLUSTER_PROXY,
        CONTAINERD_CONFIG_PREFLIGHT_READY,
        TRANSITION_CONTAINERD_CONFIG_READY,
        FINAL_CONTAINERD_CONFIG_READY,
        DECKHOUSE_REGISTRY_SWITCH_READY,
        REGISTRY_CONTAINS_REQUIRED_IMAGES,
        ERR_TRANSITION_NOT_SUPPORTED,
    ];
}

/// Condition reasons.
pub mod reasons {
    /// Checker passed.
    pub const READY: &str = "Ready";
    /// A step is waiting or failing.
    pub const PROCESSING: &str = "Processing";
    /// Unsupported transition or invalid input.
    pub const ERROR: &str = "Error";
}

/// One `metav1.Condition`. Fields are declared in the order `sigs.k8s.io/yaml` writes them
/// (alphabetical, since it goes through JSON), so our YAML matches Deckhouse's byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// RFC 3339 time of the last status flip.
    pub last_transition_time: String,
    /// Human-readable detail; empty when True (except the checker).
    #[serde(default)]
    pub message: String,
    /// Generation of the input the condition was computed from.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub observed_generation: i64,
    /// `""`, `Ready`, `Processing` or `Error`.
    #[serde(default)]
    pub reason: String,
    /// `True` or `False`.
    pub status: String,
    /// The condition type.
    #[serde(rename = "type")]
    pub type_: String,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl Condition {
    /// Whether the status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// Ordered condition list with Deckhouse's `setCondition` semantics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Conditions(pub Vec<Condition>);

impl Conditions {
    /// Sets a condition at the end of the list; keeps `lastTransitionTime` unless the status flips.
    pub fn set(
        &mut self,
        type_: &str,
        status: bool,
        reason: &str,
        message: &str,
        generation: i64,
        now: &str,
    ) {
        let status = if status { "True" } else { "False" };
        let ltt = match self.0.iter().position(|c| c.type_ == type_) {
            Some(i) => {
                let old = self.0.remove(i);
                if old.status == status {
                    old.last_transition_time
                } else {
                    now.to_string()
                }
            }
            None => now.to_string(),
        };
        self.0.push(Condition {
            last_transition_time: ltt,
            message: message.to_string(),
            observed_generation: generation,
            reason: reason.to_string(),
            status: status.to_string(),
            type_: type_.to_string(),
        });
    }

    /// True with empty reason and message.
    pub fn set_true(&mut self, type_: &str, generation: i64, now: &str) {
        self.set(type_, true, "", "", generation, now);
    }

    /// False with reason `Processing`.
    pub fn set_processing(&mut self, type_: &str, message: &str, generation: i64, now: &str) {
        self.set(type_, false, reasons::PROCESSING, message, generation, now);
    }

    /// Looks a condition up.
    pub fn get(&self, type_: &str) -> Option<&Condition> {
        self.0.iter().find(|c| c.type_ == type_)
    }

    /// Removes one type.
    pub fn remove(&mut self, type_: &str) {
        self.0.retain(|c| c.type_ != type_);
    }

    /// Drops types this controller does not know.
    pub fn prune(&mut self) {
        self.0.retain(|c| types::ALL.contains(&c.type_.as_str()));
    }

    /// Condition types in list order.
    pub fn types(&self) -> Vec<&str> {
        self.0.iter().map(|c| c.type_.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_moves_to_end_and_keeps_time_without_flip() {
        let mut c = Conditions::default();
        c.set_processing("A", "waiting", 1, "t1");
        c.set_true("B", 1, "t1");
        c.set_processing("A", "still waiting", 2, "t2");
        assert_eq!(c.types(), ["B", "A"]);
        let a = c.get("A").unwrap();
        assert_eq!(a.last_transition_time, "t1", "no flip keeps the time");
        assert_eq!(a.message, "still waiting");
        assert_eq!(a.observed_generation, 2);
        c.set_true("A", 2, "t3");
        let a = c.get("A").unwrap();
        assert_eq!(a.last_transition_time, "t3", "flip updates the time");
        assert_eq!((a.reason.as_str(), a.message.as_str()), ("", ""));
        assert!(a.is_true());
    }

    #[test]
    fn prune_and_remove() {
        let mut c = Conditions::default();
        c.set_true("Bogus", 0, "t");
        c.set_true(types::READY, 0, "t");
        c.set_true(types::IN_CLUSTER_PROXY_READY, 0, "t");
        c.prune();
        assert_eq!(c.types(), [types::READY, types::IN_CLUSTER_PROXY_READY]);
        c.remove(types::READY);
        assert_eq!(c.types(), [types::IN_CLUSTER_PROXY_READY]);
    }

    #[test]
    fn yaml_field_order_matches_sigs_yaml() {
        let mut c = Conditions::default();
        c.set_processing(
            types::READY,
            "Transitioning to Direct",
            3,
            "2025-01-01T00:00:00Z",
        );
        let y = serde_saphyr::to_string(&c).unwrap();
        let keys: Vec<&str> = y
            .lines()
            .map(|l| l.trim_start_matches(['-', ' ']))
            .filter_map(|l| l.split_once(':').map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            [
                "lastTransitionTime",
                "message",
                "observedGeneration",
                "reason",
                "status",
                "type"
            ]
        );
        let back: Conditions = serde_saphyr::from_str(&y).unwrap();
        assert_eq!(back, c);
    }
}
