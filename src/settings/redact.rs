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
        // `ssl.key.pem`, `sasl.oauthbearer.config`): redacted by the shape of their
        // name, not by a list of the ones known today.
        for (key, value) in copy.broker.kafka.properties.iter_mut() {
            if secret_shaped(key) && !value.is_empty() {
                *value = "REDACTED".into();
            }
        }
        for p in copy.providers.values_mut() {
            p.base_url = redact_url(&p.base_url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# could not render configuration: {e}\n"))
    }
}

/// Whether a property's name says its value may be a secret: it holds key, pem,
/// secret, token, password, credential, oauth or sasl (`ssl.key.location` too, which
/// is only a path: hiding a little too much is the safe side).
pub fn secret_shaped(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["key", "pem", "secret", "token", "password", "credential", "oauth", "sasl"].iter().any(|s| name.contains(s))
}

/// Replaces the password of a URL, when it has one, and the values of query
/// parameters that may carry secrets (`password`, `key`, `token`, `secret`, ...).
/// A URL without a password shows none: `REDACTED` always stands for a secret that
/// is there.
///
/// A password is not always percent-encoded as it should be: one holding `?`, `#`,
/// `/` or `@` must not come out in part. So the user information runs from the
/// scheme to the *last* `@` of the URL, whatever comes between; with a `@` in a query
/// value this hides more than the password (the host too), never less.
pub fn redact_url(url: &str) -> String {
    if !url.contains("://") && url.contains('=') {
        return redact_conninfo(url);
    }
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let (mut out, rest) = match url[scheme_end..].rfind('@').map(|i| scheme_end + i) {
        Some(at) => {
            let userinfo = &url[scheme_end..at];
            let shown = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:REDACTED"),
                None => userinfo.to_owned(),
            };
            (format!("{}{shown}@", &url[..scheme_end]), &url[at + 1..])
        }
        None => (url[..scheme_end].to_owned(), &url[scheme_end..]),
    };
    let (base, query) = match rest.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (rest, None),
    };
    out.push_str(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if secret_key(key) => format!("{key}=REDACTED"),
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

    #[test]
    fn a_password_with_url_delimiters_in_it_is_hidden_whole() {
        for password in ["pa?ss", "pa#ss", "pa@ss", "p/a?s#s@w", "?#@"] {
            for url in [format!("postgres://u:{password}@h:5432/db"), format!("amqp://u:{password}@h/%2f?heartbeat=5")]
            {
                let shown = redact_url(&url);
                assert!(
                    shown.starts_with("postgres://u:REDACTED@h") || shown.starts_with("amqp://u:REDACTED@h"),
                    "{url} -> {shown}"
                );
                assert!(!shown.contains(password), "{url} -> {shown}");
            }
        }
        assert_eq!(redact_url("postgres://u:pa?ss@h/db"), "postgres://u:REDACTED@h/db");
        assert_eq!(redact_url("amqp://u:a#b@c@h/%2f?heartbeat=5"), "amqp://u:REDACTED@h/%2f?heartbeat=5");
    }

    #[test]
    fn properties_shaped_like_secrets_are_secret() {
        for name in [
            "sasl.password",
            "ssl.key.pem",
            "sasl.oauthbearer.config",
            "ssl.keystore.password",
            "ssl.certificate.pem",
            "sasl.username",
            "x.api_token",
            "client.credentials",
        ] {
            assert!(secret_shaped(name), "{name}");
        }
        for name in ["fetch.max.bytes", "linger.ms", "compression.type", "client.rack"] {
            assert!(!secret_shaped(name), "{name}");
        }
    }
}
