//! The one composition point of configuration: the layered settings (plain data,
//! [`crate::settings`]) checked by the modules that interpret them. Settings check
//! what needs only themselves; routing checks its rules (unknown values, targets,
//! shadowed rules). Every problem of every check is reported at once.

use std::collections::BTreeMap;
use std::path::Path;

use crate::settings::{ConfigError, Settings};

/// Loads and checks the configuration from the process environment.
pub fn load(config_file: Option<&Path>) -> Result<Settings, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    checked(Settings::read_layers(config_file, None, &env))
}

/// Loads with one more file layered on top (after `--config`, before the
/// environment): the second policy of `explain --compare`.
pub fn load_with_overlay(config_file: Option<&Path>, overlay: &Path) -> Result<Settings, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    checked(Settings::read_layers(config_file, Some(overlay), &env))
}

/// Loads with an explicit environment (tests use this to avoid global state).
pub fn load_from(config_file: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
    checked(Settings::read_layers(config_file, None, env))
}

/// Fixes this process's identity (`worker.id`, generated when not configured), so
/// that everything built from the settings names the same worker.
pub fn resolve_identity(settings: &mut Settings) {
    settings.worker.id = settings.worker_id();
}

fn checked(read: Result<(Settings, Vec<String>), ConfigError>) -> Result<Settings, ConfigError> {
    let (settings, mut problems) = read?;
    problems.extend(crate::routing::validate_rules(&settings.routing.rules, &settings));
    if problems.is_empty() {
        Ok(settings)
    } else {
        Err(ConfigError { problems })
    }
}
