//! The stand-in's certificates and keys, under the names K3s gives them in
//! `<data-dir>/server/tls`.
//!
//! The cluster-wide part ([`Material`]: the server CA, the client CA and the
//! service-account key) is the same on every server (see [`super::bootstrap`]);
//! each server issues its own serving certificate (on every start: the
//! addresses may have changed) and admin client certificate (once).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use geminik8s::fsutil::write_atomic;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};

use super::ServerArgs;

/// A certificate and its key, PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// What every server of the cluster shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Material {
    /// Signs the API servers' serving certificates (`server-ca.crt`).
    pub server_ca: Pair,
    /// Signs the client certificates the API servers accept (`client-ca.crt`).
    pub client_ca: Pair,
    /// Signs and verifies service-account tokens (PKCS#8 PEM).
    pub service_account_key: String,
}

const SERVER_CA_NAME: &str = "k3s-server-ca";
const CLIENT_CA_NAME: &str = "k3s-client-ca";

fn ca_params(common_name: &str) -> anyhow::Result<CertificateParams> {
    let mut params = geminik8s::pki::params(common_name)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn new_ca(common_name: &str) -> anyhow::Result<Pair> {
    let key = KeyPair::generate().context("generating a CA key")?;
    let cert = ca_params(common_name)?.self_signed(&key).with_context(|| format!("self-signing {common_name}"))?;
    Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
}

/// The issuer for certificates signed by `ca` (named `common_name`).
fn issuer(common_name: &str, ca: &Pair) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::from_pem(&ca.key).with_context(|| format!("reading the {common_name} key"))?;
    Ok(Issuer::new(ca_params(common_name)?, key))
}

impl Material {
    /// New CAs and a new service-account key.
    pub fn generate() -> anyhow::Result<Material> {
        let sa = KeyPair::generate().context("generating the service-account key")?;
        Ok(Material {
            server_ca: new_ca(SERVER_CA_NAME)?,
            client_ca: new_ca(CLIENT_CA_NAME)?,
            service_account_key: sa.serialize_pem(),
        })
    }
}

/// The files the stand-in writes and the API server reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// `<data-dir>/server/tls`.
    pub dir: PathBuf,
    pub client_ca: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public: PathBuf,
    /// The static-token file: the K3s token authenticates as [`super::TOKEN_USER`].
    pub token_auth: PathBuf,
}

impl Files {
    pub fn in_dir(tls: &Path, cred: &Path) -> Files {
        Files {
            dir: tls.to_path_buf(),
            client_ca: tls.join("client-ca.crt"),
            serving_cert: tls.join("serving-kube-apiserver.crt"),
            serving_key: tls.join("serving-kube-apiserver.key"),
            service_account_key: tls.join("service.key"),
            service_account_public: tls.join("service.pub"),
            token_auth: cred.join("token-auth.csv"),
        }
    }
}

/// The serving certificate's names: the node's addresses, the `--tls-san`
/// values, loopback, and the in-cluster names and address of the
/// `kubernetes` service.
pub fn serving_sans(args: &ServerArgs) -> anyhow::Result<Vec<SanType>> {
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])];
    ips.extend(args.node_ip);
    ips.extend(args.advertise_address);
    if !args.bind_address.is_unspecified() {
        ips.push(args.bind_address);
    }
    ips.push(first_service_ip(&args.service_cidr)?);
    let domain = &args.cluster_domain;
    let mut names = vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        format!("kubernetes.default.svc.{domain}"),
    ];
    names.extend(args.node_name.clone());
    for san in &args.tls_sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(san.clone()),
        }
    }
    let mut sans: Vec<SanType> = Vec::new();
    for ip in ips {
        if !sans.contains(&SanType::IpAddress(ip)) {
            sans.push(SanType::IpAddress(ip));
        }
    }
    names.sort();
    names.dedup();
    for name in names {
        sans.push(SanType::DnsName(name.clone().try_into().with_context(|| format!("`{name}` as a DNS name"))?));
    }
    Ok(sans)
}

/// The first address of `cidr` (`10.43.0.0/16` -> `10.43.0.1`): the
/// `kubernetes` service's ClusterIP.
pub fn first_service_ip(cidr: &str) -> anyhow::Result<IpAddr> {
    let (net, prefix) = cidr.split_once('/').with_context(|| format!("service CIDR `{cidr}` has no /prefix"))?;
    let net: IpAddr = net.parse().with_context(|| format!("service CIDR `{cidr}`"))?;
    let _: u8 = prefix.parse().with_context(|| format!("service CIDR `{cidr}`: prefix"))?;
    Ok(match net {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) + 1).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) + 1).into()),
    })
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    organisation: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<Pair> {
    let key = KeyPair::generate().context("generating a key")?;
    let mut params = geminik8s::pki::params(common_name)?;
    let mut dn = DistinguishedName::new();
    if let Some(o) = organisation {
        dn.push(DnType::OrganizationName, o);
    }
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).with_context(|| format!("signing the certificate for {common_name}"))?;
    Ok(Pair { cert: cert.pem(), key: key.serialize_pem() })
}

/// The static-token file: one line, the K3s token as the admin's bearer token.
pub fn token_auth_csv(token: &str) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    format!("{},{},{},{}\n", quote(token), quote(super::TOKEN_USER), quote("k3s-token-admin"), quote("system:masters"))
}

/// Write K3s's server certificates for `args` from `material` into
/// `<data-dir>/server/tls` (and the token file into `server/cred`).
/// Certificates already signed by other CAs (the datastore was replaced)
/// are reissued; the serving certificate is reissued on every call.
pub fn write(args: &ServerArgs, material: &Material) -> anyhow::Result<Files> {
    let tls = args.tls_dir();
    let cred = args.data_dir.join("server/cred");
    for dir in [&tls, &cred] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let files = Files::in_dir(&tls, &cred);
    let put = |name: &str, text: &str, mode: u32| write_atomic(&tls.join(name), text.as_bytes(), mode);
    let same_cas = [("server-ca.crt", &material.server_ca.cert), ("client-ca.crt", &material.client_ca.cert)]
        .iter()
        .all(|(name, pem)| std::fs::read_to_string(tls.join(name)).is_ok_and(|on_disk| &on_disk == *pem));

    put("server-ca.crt", &material.server_ca.cert, 0o644)?;
    put("server-ca.key", &material.server_ca.key, 0o600)?;
    put("client-ca.crt", &material.client_ca.cert, 0o644)?;
    put("client-ca.key", &material.client_ca.key, 0o600)?;
    let sa = KeyPair::from_pem(&material.service_account_key).context("reading the service-account key")?;
    put("service.key", &material.service_account_key, 0o600)?;
    put("service.pub", &sa.public_key_pem(), 0o644)?;

    let server_issuer = issuer(SERVER_CA_NAME, &material.server_ca)?;
    let serving =
        leaf(&server_issuer, "kube-apiserver", None, serving_sans(args)?, ExtendedKeyUsagePurpose::ServerAuth)?;
    put("serving-kube-apiserver.crt", &serving.cert, 0o644)?;
    put("serving-kube-apiserver.key", &serving.key, 0o600)?;

    let have_admin = tls.join("client-admin.crt").is_file() && tls.join("client-admin.key").is_file();
    if !(same_cas && have_admin) {
        let client_issuer = issuer(CLIENT_CA_NAME, &material.client_ca)?;
        let admin = leaf(
            &client_issuer,
            super::TOKEN_USER,
            Some("system:masters"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        put("client-admin.crt", &admin.cert, 0o644)?;
        put("client-admin.key", &admin.key, 0o600)?;
    }
    write_atomic(&files.token_auth, token_auth_csv(&args.token).as_bytes(), 0o600)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> ServerArgs {
        let argv: Vec<String> = format!(
            "server --token to\"ken --datastore-endpoint http://127.0.0.1:2379 --node-ip 10.0.0.11 \
             --tls-san 10.0.0.100 --tls-san api.example --data-dir {}",
            dir.display()
        )
        .split_whitespace()
        .map(str::to_string)
        .collect();
        ServerArgs::parse(&argv, |_| None).unwrap()
    }

    #[test]
    fn the_first_service_address_is_the_network_plus_one() {
        assert_eq!(first_service_ip("10.43.0.0/16").unwrap(), "10.43.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(first_service_ip("fd00:43::/112").unwrap(), "fd00:43::1".parse::<IpAddr>().unwrap());
        assert!(first_service_ip("10.43.0.0").is_err());
    }

    #[test]
    fn serving_names_cover_the_node_the_vip_and_the_service() {
        let sans = serving_sans(&args(Path::new("/d"))).unwrap();
        for ip in ["10.0.0.11", "10.0.0.100", "127.0.0.1", "10.43.0.1"] {
            assert!(sans.contains(&SanType::IpAddress(ip.parse().unwrap())), "{ip} in {sans:?}");
        }
        for name in ["localhost", "kubernetes.default.svc.cluster.local", "api.example"] {
            assert!(sans.contains(&SanType::DnsName(name.to_string().try_into().unwrap())), "{name} in {sans:?}");
        }
    }

    #[test]
    fn token_file_quotes_the_token() {
        assert_eq!(token_auth_csv("a\"b"), "\"a\"\"b\",\"system:admin\",\"k3s-token-admin\",\"system:masters\"\n");
    }

    #[test]
    fn writes_k3s_file_names_and_keeps_the_admin_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let material = Material::generate().unwrap();
        let files = write(&args, &material).unwrap();
        let creds = geminik8s::k3s::ClusterCredentials::from_server_tls(&files.dir).unwrap();
        assert_eq!(creds.ca_pem, material.server_ca.cert);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.dir.join("client-admin.key")), 0o600);
        assert_eq!(mode(&files.token_auth), 0o600);
        assert!(std::fs::read_to_string(&files.service_account_public).unwrap().contains("BEGIN PUBLIC KEY"));

        // A restart keeps the admin certificate and reissues the serving one.
        let serving = std::fs::read_to_string(&files.serving_cert).unwrap();
        write(&args, &material).unwrap();
        let again = geminik8s::k3s::ClusterCredentials::from_server_tls(&files.dir).unwrap();
        assert_eq!(again.client_cert_pem, creds.client_cert_pem);
        assert_ne!(std::fs::read_to_string(&files.serving_cert).unwrap(), serving);

        // Other CAs (a new datastore): the admin certificate is reissued.
        let other = Material::generate().unwrap();
        write(&args, &other).unwrap();
        let reissued = geminik8s::k3s::ClusterCredentials::from_server_tls(&files.dir).unwrap();
        assert_eq!(reissued.ca_pem, other.server_ca.cert);
        assert_ne!(reissued.client_cert_pem, creds.client_cert_pem);
    }
}
