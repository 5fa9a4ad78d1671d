//! Connecting to PostgreSQL: the URL (or its parts) from the settings, TLS with libpq's
//! `sslmode` meanings over rustls, and the session settings of ledger connections.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::LedgerError;
use crate::settings::{DatabaseSettings, TlsMode};

/// What a connection is for: ledger sessions get the worker's session settings,
/// administrative ones (migrations, reports) are not time-limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    Ledger,
    Admin,
}

/// A connection's configuration and its TLS connector.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

fn bad(what: impl std::fmt::Display) -> LedgerError {
    LedgerError::Other(what.to_string())
}

/// Builds the connection target from the settings.
pub fn target(settings: &DatabaseSettings, session: Session) -> Result<Target, LedgerError> {
    let (url, url_mode, url_ca) = split_tls_params(&settings.url)?;
    let mode = url_mode.unwrap_or(settings.tls);
    let ca_file = url_ca.unwrap_or_else(|| settings.tls_ca_file.clone());
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| bad(format!("database.url: {e}")))?;
    if !settings.host.is_empty() {
        config.host(&settings.host);
    }
    if settings.port != 0 {
        config.port(settings.port);
    }
    if !settings.user.is_empty() {
        config.user(&settings.user);
    }
    if !settings.password.is_empty() {
        config.password(&settings.password);
    }
    if !settings.dbname.is_empty() {
        config.dbname(&settings.dbname);
    }
    let timeout = Duration::from_millis(settings.connect_timeout_ms.max(1));
    config.connect_timeout(timeout);
    // A server that vanishes without closing the connection (a network partition, a
    // killed host) is noticed within about a minute instead of the kernel's two hours.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.keepalives_interval(Duration::from_secs(10));
    config.keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("ticketflow");
    }
    if session == Session::Ledger {
        // Plan every batch for its own size and for the tables as they are now. A
        // cached generic plan, made while the tables were small, kept scanning `units`
        // whole long after it had grown (until an ANALYZE, which a server without
        // autovacuum never runs): throughput fell run after run (BENCHMARKS.md).
        let mut options = config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
        options.push_str("-c plan_cache_mode=force_custom_plan");
        if settings.statement_timeout_ms > 0 {
            options.push_str(&format!(" -c statement_timeout={}", settings.statement_timeout_ms));
        }
        config.options(&options);
    }
    config.ssl_mode(match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    let tls = MakeRustlsConnect::new(client_config(mode, &ca_file)?);
    Ok(Target { config, tls })
}

/// Removes `sslmode` and `sslrootcert` from a URL's query (tokio-postgres knows only
/// some of libpq's modes) and returns them.
fn split_tls_params(url: &str) -> Result<(String, Option<TlsMode>, Option<String>), LedgerError> {
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), None, None)) };
    let (mut mode, mut ca, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => {
                mode = Some(TlsMode::parse(value).ok_or_else(|| {
                    bad(format!(
                        "database.url: sslmode={value} is not one of disable, prefer, require, verify-ca, verify-full"
                    ))
                })?)
            }
            Some(("sslrootcert", value)) => ca = Some(value.to_owned()),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, mode, ca))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(mode: TlsMode, ca_file: &str) -> Result<rustls::ClientConfig, LedgerError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?;
    let chain = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => None,
        TlsMode::VerifyCa | TlsMode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca_file)?), provider.clone())
                .build()
                .map_err(|e| bad(format!("TLS: {e}")))?,
        ),
    };
    Ok(match (mode, chain) {
        (TlsMode::VerifyFull, Some(webpki)) => builder.with_webpki_verifier(webpki).with_no_client_auth(),
        (_, chain) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain }))
            .with_no_client_auth(),
    })
}

/// The authorities to trust: those of `ca_file`, or the system's.
fn roots(ca_file: &str) -> Result<RootCertStore, LedgerError> {
    let mut roots = RootCertStore::empty();
    if ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(bad("TLS: the system's certificate store is empty; set database.tls_ca_file"));
        }
        return Ok(roots);
    }
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(format!("database.tls_ca_file {ca_file}: {e}")))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(bad(format!("database.tls_ca_file {ca_file}: no certificate in it")));
    }
    Ok(roots)
}

/// The checks of libpq's lenient modes. The handshake's signatures are always checked
/// (the channel is really encrypted to the holder of the certificate's key); the
/// certificate itself is not checked for `prefer` and `require` (`chain` is `None`),
/// and for `verify-ca` its chain is, but not the host name it was issued for.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_replace_the_urls_and_ledger_sessions_get_their_settings() {
        let mut settings = crate::policy::load_from(None, &Default::default()).unwrap().database;
        settings.url =
            "postgres://app:old@db.internal:6432/tf?application_name=mine&options=-c%20work_mem%3D64MB".into();
        settings.password = "from-a-secret".into();
        settings.dbname = "ledger".into();
        settings.statement_timeout_ms = 1500;
        let ledger = target(&settings, Session::Ledger).unwrap().config;
        assert_eq!(ledger.get_password(), Some(&b"from-a-secret"[..]));
        assert_eq!(ledger.get_dbname(), Some("ledger"));
        assert_eq!(ledger.get_user(), Some("app"), "parts left empty keep the URL's");
        assert_eq!(ledger.get_ports(), &[6432]);
        assert_eq!(ledger.get_application_name(), Some("mine"));
        assert_eq!(
            ledger.get_options(),
            Some("-c work_mem=64MB -c plan_cache_mode=force_custom_plan -c statement_timeout=1500")
        );
        let admin = target(&settings, Session::Admin).unwrap().config;
        assert_eq!(admin.get_options(), Some("-c work_mem=64MB"), "migrations and reports are not time-limited");
    }

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_the_url() {
        let (url, mode, ca) =
            split_tls_params("postgres://u@h/db?sslmode=verify-full&application_name=x&sslrootcert=/ca.pem").unwrap();
        assert_eq!(url, "postgres://u@h/db?application_name=x");
        assert_eq!(mode, Some(TlsMode::VerifyFull));
        assert_eq!(ca.as_deref(), Some("/ca.pem"));
        assert_eq!(split_tls_params("postgres://u@h/db").unwrap(), ("postgres://u@h/db".into(), None, None));
        let err = split_tls_params("postgres://u@h/db?sslmode=sometimes").err().unwrap();
        assert!(err.to_string().contains("sslmode=sometimes is not one of"), "{err}");
    }
}
