//! Secrets out of sight: the configuration as `ticketflow config` prints it, and URLs
//! without their passwords or secret query parameters.

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

/// Replaces the password of a URL, when it has one, and the values of query
/// parameters that may carry secrets (`password`, `key`, `token`, `secret`, ...).
/// A URL without a password shows none: `REDACTED` always stands for a secret that
/// is there.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") && url.contains('=') {
        return redact_conninfo(url);
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => match base[scheme_end + 3..at].split_once(':') {
            Some((user, _password)) => format!("{}{user}:REDACTED{}", &base[..scheme_end + 3], &base[at..]),
            None => base.to_owned(),
        },
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let secret = secret_key;
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if secret(key) => format!("{key}=REDACTED"),
                _ => param.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Whether a connection parameter's name says it carries a secret.
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["pass", "key", "token", "secret", "auth", "signature", "credential"].iter().any(|s| key.contains(s))
}

/// The key=value form of a PostgreSQL connection string (`host=h password=p`), with
/// the values of secret keys replaced, quoted values (`password='a b'`) included.
fn redact_conninfo(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while let Some(eq) = rest.find('=') {
        let key = &rest[..eq];
        out.push_str(key);
        out.push('=');
        let value = &rest[eq + 1..];
        // A quoted value runs to the next unescaped quote; a bare one to whitespace.
        let len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if secret_key(key.trim()) {
            out.push_str("REDACTED");
        } else {
            out.push_str(&value[..len]);
        }
        rest = &value[len..];
        let spaces = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:REDACTED@h:5432/db");
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:REDACTED@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("https://api.x/v1?key=abc"), "https://api.x/v1?key=REDACTED");
        assert_eq!(redact_url("http://h/v1"), "http://h/v1");
        assert_eq!(
            redact_url("host=127.0.0.1 user=postgres password=s3cretPW dbname=x"),
            "host=127.0.0.1 user=postgres password=REDACTED dbname=x"
        );
        assert_eq!(
            redact_url("host=h password='a \\' b' dbname=x"),
            "host=h password=REDACTED dbname=x",
            "a quoted password with an escaped quote and a space"
        );
        assert_eq!(redact_url("host=h dbname=x"), "host=h dbname=x");
        // Nothing to hide: no REDACTED where no password was ever set.
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/ticketflow"),
            "postgres://postgres@127.0.0.1:5432/ticketflow"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=verify-full&password=hunter2&sslrootcert=/ca.pem"),
            "postgres://u@h/db?sslmode=verify-full&password=REDACTED&sslrootcert=/ca.pem"
        );
    }
}
