//! The config files the containers run with (the Kubernetes ConfigMaps, also mounted by
//! docker-compose) load and validate with the services' own loader, so a typo or a key the
//! schema does not know fails `make test` instead of a rollout.

use std::path::{Path, PathBuf};

use service_kit::config::LogFormat;
use service_kit::{ConfigError, Settings};

const BASE: &str = "k8s/base/bridge.toml";
const PROD: &str = "k8s/overlays/prod/bridge.toml";

/// A file of the repository, from this crate's manifest directory.
fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Loads a file exactly as a service does, with `env` instead of the process environment.
fn load(relative: &str, env: Vec<(String, String)>) -> Result<Settings, ConfigError> {
    Settings::load_from_vars(Some(&repo_file(relative)), env)
}

/// What the gateway Deployment (k8s/base/gateway.yaml) sets through env, with placeholders
/// for the values that come from the Secrets.
fn gateway_deployment_env() -> Vec<(String, String)> {
    vars(&[
        ("BRIDGE__AUTH__STREAM_TOKEN_SECRET", "placeholder-secret"),
        ("BRIDGE__AUTH__STREAM_TOKEN_KID", "k2"),
        (
            "BRIDGE__AUTH__PREVIOUS_STREAM_TOKEN_SECRET",
            "placeholder-old",
        ),
        ("BRIDGE__AUTH__PREVIOUS_STREAM_TOKEN_KID", "k1"),
        (
            "BRIDGE__AUTH__API_KEYS_FILE",
            "/etc/bridge-secrets/api-keys",
        ),
        (
            "BRIDGE__REDIS__URL",
            "redis://default:placeholder@redis.example.internal:6379",
        ),
    ])
}

/// Containers are reached through the pod IP: every listener must bind all interfaces.
fn assert_listens_on_all_interfaces(settings: &Settings, file: &str) {
    for (key, addr) in [
        ("gateway.addr", &settings.gateway.addr),
        ("producer.addr", &settings.producer.addr),
        ("processor.addr", &settings.processor.addr),
        ("mock_llm.addr", &settings.mock_llm.addr),
    ] {
        assert!(
            addr.starts_with("0.0.0.0:"),
            "{file}: {key} = {addr:?} must bind 0.0.0.0 inside a container"
        );
    }
}

/// A deployed config never accepts anonymous callers (SPEC §2: auth is on when deployed).
fn assert_auth_is_on(settings: &Settings, file: &str) {
    assert!(
        !settings.auth.allow_anonymous,
        "{file}: auth.allow_anonymous is for development only"
    );
}

#[test]
fn base_configmap_is_a_valid_config() -> Result<(), ConfigError> {
    let settings = load(BASE, vec![])?;

    assert_listens_on_all_interfaces(&settings, BASE);
    assert_auth_is_on(&settings, BASE);
    Ok(())
}

#[test]
fn base_configmap_accepts_the_compose_overrides() -> Result<(), ConfigError> {
    // deploy/docker-compose.yml sets this on top of the same file.
    let settings = load(BASE, vars(&[("BRIDGE__TELEMETRY__LOG_FORMAT", "text")]))?;

    assert_eq!(settings.telemetry.log_format, LogFormat::Text);
    Ok(())
}

#[test]
fn configmaps_accept_the_gateway_deployment_env() -> Result<(), ConfigError> {
    for file in [BASE, PROD] {
        let settings = load(file, gateway_deployment_env())?;

        assert_eq!(
            settings.auth.api_keys_file.as_deref(),
            Some("/etc/bridge-secrets/api-keys"),
            "{file}"
        );
        assert!(settings.auth.stream_token_secret.is_some(), "{file}");
    }
    Ok(())
}

#[test]
fn prod_overlay_config_is_valid_and_uses_no_demo_upstream() -> Result<(), ConfigError> {
    let settings = load(PROD, vec![])?;

    assert_listens_on_all_interfaces(&settings, PROD);
    assert_auth_is_on(&settings, PROD);
    for (id, model) in &settings.models {
        assert!(
            !model.base_url.contains("mock-llm"),
            "{PROD}: models.{id} points at mock-llm, which prod does not deploy"
        );
        assert!(
            model.api_key_env.is_some(),
            "{PROD}: models.{id} has no api_key_env; a real provider needs a key"
        );
    }
    assert!(
        !settings.redis.url.contains("127.0.0.1") && !settings.redis.url.contains("localhost"),
        "{PROD}: redis.url must name the external Redis, not loopback"
    );
    Ok(())
}
