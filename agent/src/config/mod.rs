//! Cloud-config: Kairos-compatible `#cloud-config` YAML with geminik8s's
//! settings under `geminik8s:`. Shared by the agent and the image builder.
//!
//! - [`yaml`]: parsing with positions, merging, emitting;
//! - [`schema`]: every key of the `geminik8s:` block, and the reference page;
//! - [`types`]: the typed block the rest of the code uses;
//! - [`validate`]: types, unknown keys, required keys, relations between keys;
//! - [`kairos`]: the Kairos keys geminik8s applies itself (`hostname`, `users`);
//! - [`load`]: sources (`/oem`, `/etc/geminik8s`, CIDATA, kernel command line).

pub mod diag;
pub mod kairos;
pub mod load;
pub mod schema;
pub mod types;
pub mod validate;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, Severity};

/// Deep-merge `over` into `base`: objects key by key, anything else (a
/// non-null value) replaces. The JSON form of the cloud-config merge rule.
pub fn merge_json(base: &mut serde_json::Value, over: &serde_json::Value) {
    use serde_json::Value;
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) if !o.is_null() => *b = o.clone(),
        _ => {}
    }
}

/// Fixtures for the tests of the modules that read the configuration (unit
/// and integration tests).
#[doc(hidden)]
pub mod fixture {
    use serde_json::{Value, json};

    use super::GeminiConfig;

    /// Only the required keys: node `a` (10.77.0.11), peer `b` (10.77.0.12), VIP 10.77.0.10.
    pub fn required() -> Value {
        json!({
            "cluster": {"name": "lab", "vip": "10.77.0.10", "bootstrap_leader": "a"},
            "node": {"name": "a", "ip": "10.77.0.11"},
            "peer": {"name": "b", "ip": "10.77.0.12"},
            "api": {"token": "t"},
            "postgres": {"replication_password": "p", "kine_password": "k"},
            "k3s": {"token": "k"},
            "tls": {"ca": "c", "cert": "c", "key": "k"},
        })
    }

    /// Settings the Kine and K3s renderers read: a Kine password that needs
    /// escaping, a non-default port and listen address, a K3s extra argument.
    pub fn services() -> GeminiConfig {
        config(json!({
            "postgres": {"kine_password": "k p", "port": 5433},
            "kine": {"listen": "127.0.0.1:12379", "compaction_interval": "10m"},
            "k3s": {"token": "k3s-token", "extra_args": ["--disable=traefik"]},
        }))
    }

    /// [`required`] with `overrides` merged over it.
    pub fn config(overrides: Value) -> GeminiConfig {
        let mut v = required();
        super::merge_json(&mut v, &overrides);
        serde_json::from_value(v).expect("a valid fixture")
    }
}
pub use load::{Loaded, Source, SourcePaths, load, load_files, load_sources};
pub use types::*;
pub use validate::CheckContext;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::schema::{KEYS, Kind};
    use super::types::GeminiConfig;

    fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&p, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }

    /// The schema table and the typed structs describe the same keys with the
    /// same defaults, so the docs rendered from the table are true.
    #[test]
    fn schema_matches_types_and_defaults() {
        let required_only = super::fixture::required();
        let full: GeminiConfig = serde_json::from_value(required_only.clone()).unwrap();
        let mut typed = BTreeMap::new();
        leaves("", &serde_json::to_value(&full).unwrap(), &mut typed);
        let schema_leaves: Vec<&str> = KEYS.iter().filter(|k| k.kind != Kind::Section).map(|k| k.path).collect();
        let typed_keys: Vec<&str> = typed.keys().map(String::as_str).collect();
        let mut sorted = schema_leaves.clone();
        sorted.sort();
        assert_eq!(sorted, typed_keys, "schema::KEYS and types.rs list different keys");
        let mut given = BTreeMap::new();
        leaves("", &required_only, &mut given);
        for key in KEYS.iter().filter(|k| k.kind != Kind::Section) {
            assert_eq!(key.required, given.contains_key(key.path), "{}: required flag differs", key.path);
            if let Some(default) = key.default {
                let want = super::yaml::parse(&format!("v: {default}"), 0).unwrap().to_json()["v"].clone();
                assert_eq!(typed[key.path], want, "{}: documented default differs from the typed default", key.path);
            }
        }
    }
}
