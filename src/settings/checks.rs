//! Cross-field checks of the settings that need only the settings themselves.

use super::{ModelSettings, ModerationMode, ProviderKind, ProviderSettings, Settings, HUMAN};

impl Settings {
    /// Cross-field checks that need no domain knowledge (rule semantics are checked
    /// by `routing`, from `policy`); returns every problem found.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.limits.max_message_bytes == 0 {
            problems.push("limits.max_message_bytes must be at least 1".into());
        }
        if self.limits.max_in_flight == 0 {
            problems.push("limits.max_in_flight must be at least 1".into());
        }
        if self.limits.ticket_deadline_ms == 0 {
            problems.push("limits.ticket_deadline_ms must be at least 1".into());
        }
        if self.limits.max_delivery_attempts == 0 {
            problems.push("limits.max_delivery_attempts must be at least 1".into());
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: '{}' is not an address of the form host:port with an IP host (e.g. 0.0.0.0:9090)",
                self.http.listen
            ));
        }
        if self.limits.account_heartbeat_ms > 60_000 {
            problems.push(format!(
                "limits.account_heartbeat_ms ({}) must be at most 60000: replicas that meet less often than once a minute cannot follow demand",
                self.limits.account_heartbeat_ms
            ));
        }
        if self.limits.budget_time_zone.parse::<chrono_tz::Tz>().is_err() {
            problems.push(format!(
                "limits.budget_time_zone: `{}` is not an IANA time zone name (e.g. \"UTC\", \"Europe/Berlin\", \"Asia/Bangkok\")",
                self.limits.budget_time_zone
            ));
        }
        if !(0.0..=0.5).contains(&self.limits.rate_limit_headroom) {
            problems.push("limits.rate_limit_headroom must be between 0 and 0.5".into());
        }
        if !self.database.tls_ca_file.is_empty() && !std::path::Path::new(&self.database.tls_ca_file).is_file() {
            problems.push(format!("database.tls_ca_file: no such file: {}", self.database.tls_ca_file));
        }
        if self.database.lease_ms < 1000 {
            problems.push(format!(
                "database.lease_ms ({}) must be at least 1000: a lease is renewed every quarter of it",
                self.database.lease_ms
            ));
        }
        let rabbit = &self.broker.rabbitmq;
        if rabbit.dead_letter_exchange.trim().is_empty() {
            problems.push("broker.rabbitmq.dead_letter_exchange must not be empty".into());
        }
        if rabbit.delivery_limit == 0 {
            problems.push("broker.rabbitmq.delivery_limit must be at least 1".into());
        }
        if rabbit.reconnect_max_secs == 0 || rabbit.stall_timeout_secs == 0 {
            problems.push("broker.rabbitmq.reconnect_max_secs and stall_timeout_secs must be at least 1".into());
        }
        if rabbit.shards > 1024 {
            problems.push(format!("broker.rabbitmq.shards is {}: at most 1024 (a queue each)", rabbit.shards));
        }
        if rabbit.shards > 0 && rabbit.member_heartbeat_ms == 0 {
            problems.push("broker.rabbitmq.member_heartbeat_ms must be at least 1 when shards is not 0".into());
        }
        for (key, path) in [
            ("tls_ca_file", &rabbit.tls_ca_file),
            ("tls_client_cert_file", &rabbit.tls_client_cert_file),
            ("tls_client_key_file", &rabbit.tls_client_key_file),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                problems.push(format!("broker.rabbitmq.{key}: no such file: {path}"));
            }
        }
        if rabbit.tls_client_cert_file.is_empty() != rabbit.tls_client_key_file.is_empty() {
            problems.push(
                "broker.rabbitmq.tls_client_cert_file and tls_client_key_file go together: set both or neither".into(),
            );
        }
        let kafka = &self.broker.kafka;
        if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&kafka.security_protocol.as_str()) {
            problems.push(format!(
                "broker.kafka.security_protocol: `{}` is not one of plaintext, ssl, sasl_plaintext, sasl_ssl",
                kafka.security_protocol
            ));
        }
        if kafka.security_protocol.starts_with("sasl")
            && !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&kafka.sasl_mechanism.as_str())
        {
            problems.push(
                "broker.kafka.sasl_mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 with a sasl_* protocol"
                    .into(),
            );
        }
        for (key, path) in [
            ("ssl_ca_file", &kafka.ssl_ca_file),
            ("ssl_certificate_file", &kafka.ssl_certificate_file),
            ("ssl_key_file", &kafka.ssl_key_file),
        ] {
            if !path.is_empty() && !std::path::Path::new(path).is_file() {
                problems.push(format!("broker.kafka.{key}: no such file: {path}"));
            }
        }
        if kafka.partitions < 1 || kafka.replication_factor < 1 {
            problems.push("broker.kafka.partitions and replication_factor must be at least 1".into());
        }
        let eval = &self.eval;
        for (key, v) in [
            ("min_route_accuracy", eval.min_route_accuracy),
            ("min_human_recall", eval.min_human_recall),
            ("min_escalation_recall", eval.min_escalation_recall),
            ("max_over_escalation", eval.max_over_escalation),
        ] {
            if !(0.0..=1.0).contains(&v) {
                problems.push(format!("eval.{key} must be a share from 0 to 1, got {v}"));
            }
        }
        if kafka.commit_interval_ms == 0 {
            problems.push("broker.kafka.commit_interval_ms must be at least 1".into());
        }
        let topics = &self.broker.topics;
        let names = [&topics.input, &topics.replies, &topics.costs, &topics.dead_letters];
        if names.iter().any(|n| n.trim().is_empty()) {
            problems.push("broker.topics: every topic or queue name must be set".into());
        }
        if names.iter().enumerate().any(|(i, a)| names[i + 1..].contains(a)) {
            problems.push("broker.topics: input, replies, costs and dead_letters must be four different names".into());
        }
        if self.breaker.failure_threshold == 0 {
            problems.push("breaker.failure_threshold must be at least 1".into());
        }
        if self.retry.max_attempts_per_model == 0 {
            problems.push("retry.max_attempts_per_model must be at least 1".into());
        }
        for (name, p) in &self.providers {
            if p.models.is_empty() {
                problems.push(format!("providers.{name}.models: a provider needs at least one model"));
            }
            if !(0.0..=1.0).contains(&p.error_rate) {
                problems.push(format!("providers.{name}.error_rate must be between 0 and 1"));
            }
            if p.requests_per_minute == 0 || p.tokens_per_minute == 0 {
                problems
                    .push(format!("providers.{name}: requests_per_minute and tokens_per_minute must be at least 1"));
            }
            if p.kind != ProviderKind::Simulated && p.api_key_env.trim().is_empty() {
                problems.push(format!("providers.{name}.api_key_env is required for kind `{}`", p.kind.as_str()));
            }
            for (model, price) in &p.models {
                let prices = [price.input_usd_per_mtok, price.cached_input_usd_per_mtok, price.output_usd_per_mtok];
                if prices.iter().any(|v| !v.is_finite() || *v < 0.0) {
                    problems.push(format!("providers.{name}.models.{model}: prices must be finite and not negative"));
                }
            }
        }
        let mut check_chain = |what: String, chain: &[String], may_be_empty: bool| {
            if chain.is_empty() && !may_be_empty {
                problems.push(format!("{what}: must name at least one model"));
            }
            for entry in chain {
                if let Err(e) = self.model(entry) {
                    problems.push(format!("{what}: {e}"));
                }
            }
        };
        check_chain("triage.chain".into(), &self.triage.chain, false);
        check_chain("triage.bypass_chain".into(), &self.triage.bypass_chain, true);
        check_chain("moderation.chain".into(), &self.moderation.chain, self.moderation.mode == ModerationMode::Local);
        check_chain("pricing.baseline_model".into(), std::slice::from_ref(&self.pricing.baseline_model), false);
        for (name, tier) in &self.tiers {
            check_chain(format!("tiers.{name}.chain"), &tier.chain, false);
            check_chain(format!("tiers.{name}.bypass_chain"), &tier.bypass_chain, true);
        }
        if self.tiers.contains_key(HUMAN) {
            problems.push("tiers.human: `human` is reserved for handoff and cannot be a tier".into());
        }
        if let Err(unknown) = crate::triage::language::Detector::new(&self.triage.latin_languages) {
            let known: Vec<&str> = crate::triage::language::LATIN.iter().map(|(_, c)| *c).collect();
            for code in unknown {
                problems.push(format!(
                    "triage.latin_languages: '{code}' is not a Latin-script language ticketflow can detect (known: {})",
                    known.join(", ")
                ));
            }
        }
        if self.triage.categories.is_empty() {
            problems.push("triage.categories: at least one category is required".into());
        }
        for category in self.triage.category_keywords.keys() {
            if !self.triage.categories.contains(category) {
                problems.push(format!("triage.category_keywords.{category}: not in triage.categories"));
            }
        }
        for category in self.policies.keys() {
            if !self.triage.categories.contains(category) {
                problems.push(format!("policies.{category}: not in triage.categories"));
            }
        }
        for (tier, budget) in &self.budgets {
            if !self.tiers.contains_key(tier) {
                problems.push(format!("budgets.{tier}: no tier named `{tier}`"));
            }
            if !budget.daily_usd.is_finite() || budget.daily_usd < 0.0 {
                problems.push(format!("budgets.{tier}.daily_usd must be a non-negative number"));
            }
            if budget.when_spent != HUMAN && !self.tiers.contains_key(&budget.when_spent) {
                problems
                    .push(format!("budgets.{tier}.when_spent: `{}` is neither `human` nor a tier", budget.when_spent));
            } else if self.budgets.contains_key(&budget.when_spent) {
                problems.push(format!(
                    "budgets.{tier}.when_spent: `{}` has a cap of its own; degrade to an uncapped tier",
                    budget.when_spent
                ));
            }
        }
        problems
    }

    /// Resolves `provider/model` to its provider and model settings.
    pub fn model(&self, reference: &str) -> Result<(&ProviderSettings, &ModelSettings), String> {
        let (provider, model) =
            reference.split_once('/').ok_or_else(|| format!("`{reference}` is not of the form provider/model"))?;
        let p = self.providers.get(provider).ok_or_else(|| format!("`{reference}`: no provider named `{provider}`"))?;
        let m = p
            .models
            .get(model)
            .ok_or_else(|| format!("`{reference}`: provider `{provider}` has no model `{model}`"))?;
        Ok((p, m))
    }
}
