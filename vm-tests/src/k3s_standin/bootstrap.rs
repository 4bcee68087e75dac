//! The cluster's bootstrap material in the datastore, as K3s keeps it: one
//! record per token, encrypted with a key derived from the token, created by
//! the first server and read by the others.
//!
//! The record is `/geminik8s/k3s-standin/bootstrap/<first 12 hex digits of
//! SHA-256(token)>`. Its value is `MAGIC | salt (16) | nonce (12) |
//! AES-256-GCM(JSON of [`Material`])`, the key PBKDF2-HMAC-SHA256(token, salt).
//! Creation is an etcd transaction "create if absent" (the form Kine
//! supports), so two servers starting at once agree on one record.

use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::Context;
use geminik8s::kine::{self, put_varint};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::tls::Material;

pub const KEY_PREFIX: &str = "/geminik8s/k3s-standin/bootstrap/";
const MAGIC: &[u8] = b"gk8s-bootstrap-1\n";
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const PBKDF2_ROUNDS: u32 = 20_000;
/// Time limit of one datastore call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the datastore may be unreachable before the stand-in gives up.
const DATASTORE_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the bootstrap record is not one the stand-in wrote (bad header or too short)")]
    Format,
    #[error("the bootstrap record does not decrypt with this token: every server needs the same K3s token")]
    WrongToken,
    #[error("the system random generator failed")]
    Random,
}

/// The datastore key of `token`'s record.
pub fn key(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_PREFIX}{}", &hex[..12])
}

fn cipher(token: &str, salt: &[u8]) -> LessSafeKey {
    let mut key = [0u8; 32];
    let rounds = NonZeroU32::new(PBKDF2_ROUNDS).expect("non-zero rounds");
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, rounds, salt, token.as_bytes(), &mut key);
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte AES-256 key"))
}

/// Encrypt `plain` with a key derived from `token`.
pub fn seal(token: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let rng = SystemRandom::new();
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|_| SealError::Random)?;
    rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let mut data = plain.to_vec();
    cipher(token, &salt)
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(MAGIC), &mut data)
        .map_err(|_| SealError::Random)?;
    Ok([MAGIC, &salt, &nonce, &data].concat())
}

/// Decrypt what [`seal`] produced.
pub fn open(token: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let rest = sealed.strip_prefix(MAGIC).ok_or(SealError::Format)?;
    if rest.len() < SALT_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(SealError::Format);
    }
    let (salt, rest) = rest.split_at(SALT_LEN);
    let (nonce, data) = rest.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Format)?;
    let mut data = data.to_vec();
    let plain =
        cipher(token, salt).open_in_place(nonce, Aad::from(MAGIC), &mut data).map_err(|_| SealError::WrongToken)?;
    Ok(plain.to_vec())
}

// The few etcd messages used here, in protobuf wire format
// (go.etcd.io/etcd/api/etcdserverpb/rpc.proto, mvccpb/kv.proto).

fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn field_varint(out: &mut Vec<u8>, field: u64, value: u64) {
    put_varint(out, field << 3);
    put_varint(out, value);
}

/// `TxnRequest`: if `key`'s mod revision is 0 (absent), put `value`.
pub fn create_request(key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut compare = Vec::new();
    field_varint(&mut compare, 2, 2); // target = MOD (result EQUAL is the default, 0)
    field_bytes(&mut compare, 3, key);
    field_varint(&mut compare, 6, 0); // mod_revision = 0
    let mut put = Vec::new();
    field_bytes(&mut put, 1, key);
    field_bytes(&mut put, 2, value);
    let mut op = Vec::new();
    field_bytes(&mut op, 2, &put); // RequestOp.request_put
    let mut txn = Vec::new();
    field_bytes(&mut txn, 1, &compare);
    field_bytes(&mut txn, 2, &op);
    txn
}

/// A protobuf field: number and value (varints as numbers, length-delimited as bytes).
#[derive(Debug, PartialEq)]
enum Field<'a> {
    Varint(u64, u64),
    Bytes(u64, &'a [u8]),
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The fields of one message; `None` when it is malformed.
fn fields(mut buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        let number = tag >> 3;
        match tag & 7 {
            0 => out.push(Field::Varint(number, varint(&mut buf)?)),
            1 => buf = buf.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                out.push(Field::Bytes(number, buf.get(..len)?));
                buf = &buf[len..];
            }
            5 => buf = buf.get(4..)?,
            _ => return None,
        }
    }
    Some(out)
}

/// `TxnResponse.succeeded`.
pub fn txn_succeeded(response: &[u8]) -> Option<bool> {
    let fields = fields(response)?;
    Some(fields.iter().any(|f| matches!(f, Field::Varint(2, v) if *v != 0)))
}

/// The value of the first key in a `RangeResponse`, if any.
pub fn range_value(response: &[u8]) -> Option<Option<Vec<u8>>> {
    for field in fields(response)? {
        if let Field::Bytes(2, kv) = field {
            let value = fields(kv)?.into_iter().find_map(|f| match f {
                Field::Bytes(5, v) => Some(v.to_vec()),
                _ => None,
            });
            // A present key with an empty value has no field 5.
            return Some(Some(value.unwrap_or_default()));
        }
    }
    Some(None)
}

async fn get(endpoint: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let response =
        kine::call(endpoint, "etcdserverpb.KV/Range", &kine::range_request(key.as_bytes(), 1), CALL_TIMEOUT).await?;
    range_value(&response).with_context(|| format!("reading {key}: malformed RangeResponse from {endpoint}"))
}

async fn create(endpoint: &str, key: &str, value: &[u8]) -> anyhow::Result<bool> {
    let response =
        kine::call(endpoint, "etcdserverpb.KV/Txn", &create_request(key.as_bytes(), value), CALL_TIMEOUT).await?;
    txn_succeeded(&response).with_context(|| format!("creating {key}: malformed TxnResponse from {endpoint}"))
}

async fn fetch_or_create_once(endpoint: &str, token: &str) -> anyhow::Result<(Material, bool)> {
    let key = key(token);
    let decode = |sealed: &[u8]| -> anyhow::Result<Material> {
        let plain = open(token, sealed).with_context(|| format!("reading {key}"))?;
        serde_json::from_slice(&plain).with_context(|| format!("decoding {key}"))
    };
    if let Some(sealed) = get(endpoint, &key).await? {
        return Ok((decode(&sealed)?, false));
    }
    let material = Material::generate()?;
    let plain = serde_json::to_vec(&material).context("encoding the bootstrap material")?;
    if create(endpoint, &key, &seal(token, &plain)?).await? {
        return Ok((material, true));
    }
    // Another server created it first: use theirs.
    let sealed = get(endpoint, &key).await?.with_context(|| format!("{key} was created and is gone again"))?;
    Ok((decode(&sealed)?, false))
}

/// The cluster's bootstrap material from the datastore at `endpoint`
/// (Kine's etcd endpoint), created there if this is the first server.
/// Waits for the datastore as K3s does (up to five minutes); a record that
/// does not decrypt with `token` is an error at once.
pub async fn fetch_or_create(endpoint: &str, token: &str) -> anyhow::Result<Material> {
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        match fetch_or_create_once(endpoint, token).await {
            Ok((material, created)) => {
                let how = if created { "created" } else { "read" };
                eprintln!("k3s-standin: bootstrap material {how} at {} in {endpoint}", key(token));
                return Ok(material);
            }
            Err(e) if e.downcast_ref::<kine::KineError>().is_none() => return Err(e),
            Err(e) if started.elapsed() >= DATASTORE_WAIT => {
                return Err(e.context(format!("the datastore at {endpoint} did not answer for {DATASTORE_WAIT:?}")));
            }
            Err(e) => {
                if attempt % 10 == 0 {
                    eprintln!("k3s-standin: waiting for the datastore at {endpoint}: {e:#}");
                }
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_with_the_token_only() {
        let sealed = seal("token-a", b"secret material").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(open("token-a", &sealed).unwrap(), b"secret material");
        assert!(matches!(open("token-b", &sealed), Err(SealError::WrongToken)));
        assert!(matches!(open("token-a", b"garbage"), Err(SealError::Format)));
        assert_ne!(seal("token-a", b"x").unwrap(), seal("token-a", b"x").unwrap(), "fresh salt and nonce");
    }

    #[test]
    fn the_key_depends_on_the_token() {
        assert!(key("a").starts_with(KEY_PREFIX));
        assert_eq!(key("a").len(), KEY_PREFIX.len() + 12);
        assert_ne!(key("a"), key("b"));
        assert_eq!(key("a"), key("a"));
    }

    #[test]
    fn create_request_wire_format() {
        // Compare{target: MOD, key: "k", mod_revision: 0}, success: [RequestOp{request_put: {key: "k", value: "v"}}]
        assert_eq!(
            create_request(b"k", b"v"),
            [
                0x0a, 7, 0x10, 2, 0x1a, 1, b'k', 0x30, 0, // compare
                0x12, 8, 0x12, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // success
            ]
        );
    }

    #[test]
    fn responses_are_decoded() {
        // TxnResponse{header: {revision: 5}, succeeded: true}
        assert_eq!(txn_succeeded(&[0x0a, 2, 0x18, 5, 0x10, 1]), Some(true));
        assert_eq!(txn_succeeded(&[0x0a, 2, 0x18, 5]), Some(false));
        // RangeResponse{header, kvs: [{key: "k", create_revision: 3, value: "hello"}], count: 1}
        let kv = [0x0a, 1, b'k', 0x10, 3, 0x2a, 5, b'h', b'e', b'l', b'l', b'o'];
        let mut response = vec![0x0a, 2, 0x18, 5, 0x12, kv.len() as u8];
        response.extend_from_slice(&kv);
        response.extend_from_slice(&[0x20, 1]);
        assert_eq!(range_value(&response), Some(Some(b"hello".to_vec())));
        assert_eq!(range_value(&[0x0a, 2, 0x18, 5]), Some(None));
        assert_eq!(range_value(&[0x12, 9, 1]), None, "a truncated message is malformed");
    }
}
