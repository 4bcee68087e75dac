//! Mutual TLS for the agent API and the witness: every party presents a
//! certificate signed by the cluster CA from `gemin_k8s init`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::Tls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what}: {source}")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} holds no usable PEM {kind}: {detail}")]
    Pem { what: &'static str, kind: &'static str, detail: String },
    #[error("building the TLS configuration: {0}")]
    Config(String),
}

/// The CA, this party's certificate chain and its key.
#[derive(Debug)]
pub struct TlsMaterial {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { what, kind: "certificate", detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, kind: "certificate", detail: "no CERTIFICATE block".into() });
    }
    Ok(certs)
}

fn roots(ca: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs("the CA certificate", ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            what: "the CA certificate",
            kind: "certificate",
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

impl TlsMaterial {
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        crate::tls::install_crypto_provider();
        let roots = roots(ca)?;
        let chain = certs("the certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| TlsError::Pem {
            what: "the key",
            kind: "private key",
            detail: e.to_string(),
        })?;
        Ok(TlsMaterial { roots, chain, key })
    }

    /// From the `tls:` block (inline PEM or paths).
    pub fn from_config(tls: &Tls) -> Result<Self, TlsError> {
        let read = |what, v: &str| Tls::resolve(v).map_err(|source| TlsError::Read { what, source });
        Self::from_pem(&read("tls.ca", &tls.ca)?, &read("tls.cert", &tls.cert)?, &read("tls.key", &tls.key)?)
    }

    /// Server side: a client certificate signed by the CA is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder(Arc::new(self.roots.clone()))
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side: trusts only the CA, presents our certificate.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder()
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// An HTTP client for the agent API or the witness, with a per-request timeout.
    pub fn http_client(&self, timeout: Duration) -> Result<HttpClient, TlsError> {
        let config = self.client_config()?;
        let client = build_http(&config, timeout)?;
        let state = Mutex::new(Renewing { client, failures: 0 });
        Ok(HttpClient(Arc::new(Renewable { config, timeout, state })))
    }
}

/// After how many failed requests in a row [`HttpClient`] opens a new connection.
const RENEW_AFTER: u32 = 3;

/// An HTTP client over mutual TLS whose pooled connection is replaced after
/// [`RENEW_AFTER`] failed requests in a row. A connection can wedge where
/// TCP cannot tell: the other end's process stalled while its kernel still
/// acknowledges (after the agent was paused, the peer's server sat on the
/// streams it had queued), and every request on it would time out.
#[derive(Debug, Clone)]
pub struct HttpClient(Arc<Renewable>);

#[derive(Debug)]
struct Renewable {
    config: ClientConfig,
    timeout: Duration,
    state: Mutex<Renewing>,
}

#[derive(Debug)]
struct Renewing {
    client: reqwest::Client,
    failures: u32,
}

impl HttpClient {
    /// The client to send the next request with (cheap: a shared handle).
    pub fn get(&self) -> reqwest::Client {
        self.lock().client.clone()
    }

    /// Record whether a request sent with [`Self::get`]'s client got an
    /// answer (whatever its status).
    pub fn answered(&self, ok: bool) {
        let mut state = self.lock();
        if ok {
            state.failures = 0;
            return;
        }
        state.failures += 1;
        if state.failures >= RENEW_AFTER {
            // Only fails on a configuration that built before.
            if let Ok(client) = build_http(&self.0.config, self.0.timeout) {
                tracing::debug!(failures = state.failures, "requests keep failing: opening a new connection");
                *state = Renewing { client, failures: 0 };
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Renewing> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn build_http(config: &ClientConfig, timeout: Duration) -> Result<reqwest::Client, TlsError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(config.clone())
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        // After a silent cut TCP backs its retransmissions off for up to
        // two minutes, and every request queued on the pooled connection
        // times out meanwhile: drop a connection whose data stays
        // unacknowledged, so the next request opens a new one.
        .tcp_user_timeout((timeout * 2).max(Duration::from_secs(1)))
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}
