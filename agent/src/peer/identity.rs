//! Who is calling: the identity in the client certificate of a mutual-TLS
//! connection, as `gemin_k8s init` issues them (see [`crate::pki`]).
//!
//! Every certificate of a cluster is signed by the same CA, so the CA alone
//! says only "one of ours". The name says which: a node's certificate carries
//! the node's name (CN and a DNS name), the operator's CN is [`OPERATOR`] and
//! the witness's [`WITNESS`]; no node may take either name.

use rustls::pki_types::CertificateDer;
use x509_cert::Certificate;
use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use x509_cert::der::oid::db::rfc4519::CN;
use x509_cert::der::{Decode, Tag, Tagged};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// The common name of the operator's certificate.
pub const OPERATOR: &str = "operator";
/// The common name of the witness's certificate.
pub const WITNESS: &str = "witness";
/// Names no node may have: they identify the operator's and the witness's certificates.
pub const RESERVED: &[&str] = &[OPERATOR, WITNESS];

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the client certificate is not valid DER: {0}")]
    Der(String),
    #[error("the client certificate names nobody (no common name, no DNS name)")]
    Nameless,
}

/// The names in a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub common_name: Option<String>,
    /// The subject alternative DNS names.
    pub dns_names: Vec<String>,
}

/// What the identity is, by the names `init` gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role<'a> {
    Operator,
    Witness,
    /// A node's certificate, with the node's name.
    Node(&'a str),
}

impl Identity {
    /// The identity of a DER certificate (the leaf a client presented).
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
        let cert = Certificate::from_der(der.as_ref()).map_err(|e| IdentityError::Der(e.to_string()))?;
        let tbs = &cert.tbs_certificate;
        let common_name =
            tbs.subject.0.iter().flat_map(|rdn| rdn.0.iter()).filter(|atv| atv.oid == CN).find_map(|atv| {
                let v = &atv.value;
                match v.tag() {
                    Tag::Utf8String => Utf8StringRef::try_from(v).ok().map(|s| s.as_str().to_string()),
                    Tag::PrintableString => PrintableStringRef::try_from(v).ok().map(|s| s.as_str().to_string()),
                    Tag::Ia5String => Ia5StringRef::try_from(v).ok().map(|s| s.as_str().to_string()),
                    _ => None,
                }
            });
        let san = tbs.get::<SubjectAltName>().map_err(|e| IdentityError::Der(e.to_string()))?;
        let dns_names = san
            .map(|(_, san)| {
                san.0
                    .into_iter()
                    .filter_map(|n| match n {
                        GeneralName::DnsName(d) => Some(d.as_str().to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let identity = Identity { common_name, dns_names };
        if identity.name().is_none() {
            return Err(IdentityError::Nameless);
        }
        Ok(identity)
    }

    /// The name this certificate speaks for: its common name, else its first
    /// DNS name other than `localhost` (which every node certificate carries).
    pub fn name(&self) -> Option<&str> {
        self.common_name
            .as_deref()
            .filter(|cn| !cn.is_empty())
            .or_else(|| self.dns_names.iter().map(String::as_str).find(|d| *d != "localhost"))
    }

    pub fn role(&self) -> Option<Role<'_>> {
        self.name().map(|name| match name {
            OPERATOR => Role::Operator,
            WITNESS => Role::Witness,
            node => Role::Node(node),
        })
    }

    /// Whether this is the certificate of the node called `node`.
    pub fn is_node(&self, node: &str) -> bool {
        self.role() == Some(Role::Node(node))
    }

    pub fn is_operator(&self) -> bool {
        self.role() == Some(Role::Operator)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name().unwrap_or("?"))
    }
}

/// Who made a request; a request extension set by the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The local Unix socket (root on the node).
    Local,
    /// A mutual-TLS client with a certificate signed by the cluster CA.
    Certificate(Identity),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Local => f.write_str("local socket"),
            Caller::Certificate(id) => write!(f, "certificate {id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn names_and_roles_of_the_certificates_init_issues() {
        let nodes = vec![("node-a".to_string(), "10.0.0.1".parse().unwrap())];
        let pki = crate::pki::generate("shop", &nodes, "10.0.0.10".parse().unwrap(), Some("10.0.0.9".parse().unwrap()))
            .unwrap();
        let node = Identity::from_der(&der(&pki.nodes[0].cert)).unwrap();
        assert_eq!(node.common_name.as_deref(), Some("node-a"));
        assert_eq!(node.dns_names, ["node-a", "localhost"]);
        assert_eq!(node.role(), Some(Role::Node("node-a")));
        assert!(node.is_node("node-a") && !node.is_node("localhost") && !node.is_node("node-b"));

        let operator = Identity::from_der(&der(&pki.operator.cert)).unwrap();
        assert_eq!(operator.role(), Some(Role::Operator));
        assert!(operator.is_operator() && !operator.is_node("operator"));
        let witness = Identity::from_der(&der(&pki.witness.unwrap().cert)).unwrap();
        assert_eq!(witness.role(), Some(Role::Witness));
        assert_eq!(witness.to_string(), "witness");
    }

    #[test]
    fn a_dns_name_stands_in_for_a_missing_common_name() {
        let id = Identity { common_name: None, dns_names: vec!["localhost".into(), "node-b".into()] };
        assert_eq!(id.name(), Some("node-b"));
        let nobody = Identity { common_name: None, dns_names: vec!["localhost".into()] };
        assert_eq!(nobody.name(), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            Identity::from_der(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(IdentityError::Der(_))
        ));
    }
}
