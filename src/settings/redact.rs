//! Secrets out of sight: the configuration as `ticketflow config` prints it, and URLs
//! without their passwords or query strings.

use super::Settings;

impl Settings {
    /// The effective configuration as TOML with every secret redacted.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.database.url = redact_url(&copy.database.url);
        if !copy.database.password.is_empty() {
            copy.database.password = "REDACTED".into();
        }
        copy.broker.rabbitmq.url = redact_url(&copy.broker.rabbitmq.url);
        // Passthrough librdkafka properties may carry secrets (`sasl.password`,
        // `ssl.key.password`, `sasl.oauthbearer.client.secret`).
        for (key, value) in copy.broker.kafka.properties.iter_mut() {
            if ["password", "secret", "token"].iter().any(|s| key.contains(s)) {
                *value = "REDACTED".into();
            }
        }
        for p in copy.providers.values_mut() {
            p.base_url = redact_url(&p.base_url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
    }
}

/// Replaces the password (and any query string, which may carry tokens) of a URL.
pub fn redact_url(url: &str) -> String {
    let (without_query, had_query) = match url.split_once('?') {
        Some((base, _)) => (base, true),
        None => (url, false),
    };
    let redacted = match (without_query.find("://"), without_query.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &without_query[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:REDACTED{}", &without_query[..scheme_end + 3], &without_query[at..])
        }
        _ => without_query.to_owned(),
    };
    if had_query {
        format!("{redacted}?REDACTED")
    } else {
        redacted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:REDACTED@h:5432/db");
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:REDACTED@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("https://api.x/v1?key=abc"), "https://api.x/v1?REDACTED");
        assert_eq!(redact_url("http://h/v1"), "http://h/v1");
    }
}
