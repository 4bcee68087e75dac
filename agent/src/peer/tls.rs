//! Mutual TLS for the agent API and the witness: every party presents a
//! certificate signed by the cluster CA from `gemin_k8s init`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
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
    /// Revoked certificates, refused from callers and from servers.
    crls: Vec<CertificateRevocationListDer<'static>>,
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
        Ok(TlsMaterial { roots, chain, key, crls: Vec::new() })
    }

    /// Refuse the certificates the PEM revocation list `crl` names (signed
    /// by the CA; `gemin_k8s replace-node` writes it).
    pub fn with_crl(mut self, crl: Option<&str>) -> Result<Self, TlsError> {
        let Some(crl) = crl else { return Ok(self) };
        let pem = |detail: String| TlsError::Pem { what: "the revocation list (tls.crl)", kind: "X509 CRL", detail };
        self.crls = CertificateRevocationListDer::pem_slice_iter(crl.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| pem(e.to_string()))?;
        if self.crls.is_empty() {
            return Err(pem("no X509 CRL block".into()));
        }
        Ok(self)
    }

    /// From the `tls:` block (inline PEM or paths).
    pub fn from_config(tls: &Tls) -> Result<Self, TlsError> {
        let read = |what, v: &str| Tls::resolve(v).map_err(|source| TlsError::Read { what, source });
        let crl = tls.crl.as_deref().map(|c| read("tls.crl", c)).transpose()?;
        Self::from_pem(&read("tls.ca", &tls.ca)?, &read("tls.cert", &tls.cert)?, &read("tls.key", &tls.key)?)?
            .with_crl(crl.as_deref())
    }

    /// Whether this party's own certificate passes the client check with
    /// the revocation list: a list from another CA (it would leave every
    /// certificate's status unknown, so refused) or one revoking this very
    /// certificate fails.
    pub fn check_own_certificate(&self) -> Result<(), TlsError> {
        let leaf = self.chain.first().ok_or_else(|| TlsError::Config("no certificate".into()))?;
        self.client_verifier()?
            .verify_client_cert(leaf, &self.chain[1..], rustls::pki_types::UnixTime::now())
            .map(drop)
            .map_err(|e| TlsError::Config(format!("this party's own certificate fails the check: {e}")))
    }

    /// How callers' certificates are checked: signed by the CA, not revoked.
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder(Arc::new(self.roots.clone()))
            .with_crls(self.crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// Server side: a client certificate signed by the CA, and not revoked, is required.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder()
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Client side: trusts only the CA (and no certificate it revoked),
    /// presents our certificate.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let verifier = WebPkiServerVerifier::builder(Arc::new(self.roots.clone()))
            .with_crls(self.crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ClientConfig::builder()
            .with_webpki_verifier(verifier)
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

/// How long a connection may be idle before TCP probes the other end, and
/// between probes.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// The longest data or a keepalive probe may go unacknowledged before the
/// connection is dropped, whatever the request's timeout.
const DEAD_AFTER: Duration = Duration::from_secs(60);

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
        .tcp_user_timeout((timeout * 2).clamp(Duration::from_secs(1), DEAD_AFTER))
        // A machine that powers off while a long request waits for its
        // answer (an upgrade's passive slot being written) sends nothing
        // more, and an idle connection has nothing to retransmit: probe it,
        // so the request fails within about a minute rather than at its
        // timeout of up to an hour.
        .tcp_keepalive(KEEPALIVE)
        .tcp_keepalive_interval(KEEPALIVE)
        .tcp_keepalive_retries(3)
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn a_replacement_certificate_is_accepted_and_the_revoked_one_refused() {
        let nodes = vec![
            ("node1".to_string(), "10.0.0.1".parse().unwrap()),
            ("node2".to_string(), "10.0.0.2".parse().unwrap()),
        ];
        let vip = "10.0.0.10".parse().unwrap();
        let cluster = pki::generate("shop", &nodes, vip, None).unwrap();
        let signer = pki::CaSigner::new("shop", &cluster.ca.key).unwrap();
        let new = signer.node("node2", "10.0.0.22".parse().unwrap(), vip).unwrap();
        let old_serial = pki::serial(&cluster.nodes[1].cert).unwrap();
        assert_ne!(old_serial, pki::serial(&new.cert).unwrap());
        let crl = signer.revocation_list(std::slice::from_ref(&old_serial), 1).unwrap();
        assert_eq!(pki::revoked(&crl).unwrap(), (vec![old_serial], 1));

        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        let survivor = |crl: Option<&str>| {
            TlsMaterial::from_pem(&cluster.ca.cert, &cluster.nodes[0].cert, &cluster.nodes[0].key)
                .unwrap()
                .with_crl(crl)
                .unwrap()
                .client_verifier()
                .unwrap()
        };
        let without = survivor(None);
        assert!(without.verify_client_cert(&der(&cluster.nodes[1].cert), &[], now).is_ok());
        assert!(without.verify_client_cert(&der(&new.cert), &[], now).is_ok(), "the CA rebuilt from its key signs");
        let with = survivor(Some(&crl));
        let refused = with.verify_client_cert(&der(&cluster.nodes[1].cert), &[], now).unwrap_err();
        assert!(refused.to_string().to_lowercase().contains("revoked"), "{refused}");
        assert!(with.verify_client_cert(&der(&new.cert), &[], now).is_ok());
        assert!(with.verify_client_cert(&der(&cluster.operator.cert), &[], now).is_ok());
        assert!(matches!(
            TlsMaterial::from_pem(&cluster.ca.cert, &new.cert, &new.key).unwrap().with_crl(Some("garbage")),
            Err(TlsError::Pem { .. })
        ));

        // The survivor takes the list; a list of another CA, or one revoking
        // the taker's own certificate, is refused.
        let own = |cert: &pki::CertKey, crl: &str| {
            TlsMaterial::from_pem(&cluster.ca.cert, &cert.cert, &cert.key).unwrap().with_crl(Some(crl)).unwrap()
        };
        own(&cluster.nodes[0], &crl).check_own_certificate().unwrap();
        own(&cluster.nodes[1], &crl).check_own_certificate().unwrap_err();
        let other = pki::generate("elsewhere", &nodes, vip, None).unwrap();
        let foreign = pki::CaSigner::new("elsewhere", &other.ca.key).unwrap().revocation_list(&[], 1).unwrap();
        own(&cluster.nodes[0], &foreign).check_own_certificate().unwrap_err();
    }
}
