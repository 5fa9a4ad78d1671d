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

/// The instruction and policy texts that a provider they go to would refuse: each
/// text sent to a provider with a content filter (its `filter_words`) is matched as
/// that filter matches a request, which it reads whole, system prompt included. A
/// hit means every such request is refused there, pays a moderation check and goes
/// to a bypass model: the cheap tier stops being cheap. One line per text, provider
/// and word; `ticketflow config` prints them as warnings.
pub fn filter_warnings(settings: &Settings) -> Vec<String> {
    use crate::triage::keywords::KeywordSet;
    let filters: BTreeMap<&str, KeywordSet> = settings
        .providers
        .iter()
        .filter(|(_, p)| !p.filter_words.is_empty())
        .map(|(name, p)| (name.as_str(), KeywordSet::new([("filter", p.filter_words.iter())])))
        .collect();
    let mut warnings = std::collections::BTreeSet::new();
    let mut check = |what: &str, text: &str, chains: &[&Vec<String>]| {
        let lower = text.to_lowercase();
        for entry in chains.iter().flat_map(|chain| chain.iter()) {
            let provider = entry.split('/').next().unwrap_or(entry);
            if let Some(word) = filters.get(provider).and_then(|f| f.first_match(&lower)) {
                warnings.insert(format!(
                    "{what} contains `{word}`, which {provider}'s content filter refuses \
                     (providers.{provider}.filter_words): every request carrying it to {provider} would be refused"
                ));
            }
        }
    };
    let triage = &settings.triage;
    let triage_prompt = crate::triage::prompt::triage_system(&triage.categories);
    check("the triage prompt", &triage_prompt, &[&triage.chain, &triage.bypass_chain]);
    if settings.moderation.mode == crate::settings::ModerationMode::Model {
        check("the moderation prompt", crate::moderation::MODERATION_SYSTEM, &[&settings.moderation.chain]);
    }
    for (name, tier) in &settings.tiers {
        let chains = [&tier.chain, &tier.bypass_chain];
        check("the reply prompt", &crate::triage::prompt::reply_system("", None, "", ""), &chains);
        check(&format!("tiers.{name}.instruction"), &tier.instruction, &chains);
        for (category, policy) in &settings.policies {
            check(&format!("policies.{category}"), policy, &chains);
        }
    }
    warnings.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_prompts_and_policies_pass_their_providers_filters() {
        let settings = load_from(None, &BTreeMap::new()).unwrap();
        assert_eq!(filter_warnings(&settings), Vec::<String>::new());
    }

    #[test]
    fn a_policy_or_instruction_with_a_filter_word_is_named_with_the_word_and_provider() {
        let mut settings = load_from(None, &BTreeMap::new()).unwrap();
        settings.policies.insert("shipping".into(), "Parcels damaged in transit are replaced.".into());
        settings.tiers.get_mut("cheap").unwrap().instruction = "Never mention a lawsuit.".into();
        settings.providers.get_mut("qwen").unwrap().filter_words.push("lawsuit".into());
        let warnings = filter_warnings(&settings);
        assert!(
            warnings.iter().any(|w| w.starts_with("policies.shipping contains `damaged`, which qwen's")),
            "{warnings:?}"
        );
        assert!(warnings.iter().any(|w| w.starts_with("tiers.cheap.instruction contains `lawsuit`")), "{warnings:?}");
        // Texts that only go to providers without the word are not named.
        assert!(!warnings.iter().any(|w| w.contains("tiers.premium")), "{warnings:?}");
    }
}
