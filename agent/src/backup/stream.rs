//! The byte pipelines: content → zstd → age → checksum → store when
//! writing, and the reverse when reading, each end counting and hashing.

use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

use super::crypto::{Identities, Keys};
use super::manifest::{Compression, Encryption};
use super::store::ObjectWriter;
use super::{BackupError, Result};

/// Counts and hashes what passes through to `inner`.
pub struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    count: u64,
}

impl<T> Hashing<T> {
    pub fn new(inner: T) -> Hashing<T> {
        Hashing { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The inner writer or reader, the byte count and the hex SHA-256.
    pub fn finish(self) -> (T, u64, String) {
        (self.inner, self.count, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Optional encryption in front of `W`.
enum Sealing<W: Write> {
    Age(age::stream::StreamWriter<W>),
    Plain(W),
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Age(w) => w.write(buf),
            Sealing::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Age(w) => w.flush(),
            Sealing::Plain(w) => w.flush(),
        }
    }
}

impl<W: Write> Sealing<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Sealing::Age(w) => w.finish(),
            Sealing::Plain(w) => Ok(w),
        }
    }
}

/// Optional compression in front of `W`.
enum Packing<W: Write> {
    Zstd(zstd::Encoder<'static, W>),
    Plain(W),
}

impl<W: Write> Write for Packing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Packing::Zstd(w) => w.write(buf),
            Packing::Plain(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Packing::Zstd(w) => w.flush(),
            Packing::Plain(w) => w.flush(),
        }
    }
}

impl<W: Write> Packing<W> {
    fn finish(self) -> io::Result<W> {
        match self {
            Packing::Zstd(w) => w.finish(),
            Packing::Plain(w) => Ok(w),
        }
    }
}

type Stored = Hashing<io::BufWriter<Box<dyn ObjectWriter>>>;

/// Writes an object: content in, compressed, encrypted, hashed at both
/// ends, into the store.
pub struct ObjectSink {
    inner: Hashing<Packing<Sealing<Stored>>>,
}

/// Sizes and checksums of a written object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
    pub content_size: u64,
    pub content_sha256: String,
}

impl ObjectSink {
    /// `name` is the object's name, for errors.
    pub fn new(object: Box<dyn ObjectWriter>, name: &str, compression: Compression, keys: &Keys) -> Result<ObjectSink> {
        let stored = Hashing::new(io::BufWriter::with_capacity(1 << 20, object));
        let sealing = match keys.encryptor()? {
            Some(e) => Sealing::Age(e.wrap_output(stored).map_err(|e| BackupError::Io {
                action: "writing the encryption header".into(),
                path: name.into(),
                cause: e,
            })?),
            None => Sealing::Plain(stored),
        };
        let packing = match compression {
            Compression::None => Packing::Plain(sealing),
            Compression::Zstd { level } => {
                Packing::Zstd(zstd::Encoder::new(sealing, level).map_err(|e| BackupError::Io {
                    action: format!("starting zstd at level {level}"),
                    path: Default::default(),
                    cause: e,
                })?)
            }
        };
        Ok(ObjectSink { inner: Hashing::new(packing) })
    }

    /// Finish compression and encryption, commit the object, and return
    /// its sizes and checksums.
    pub fn finish(self) -> io::Result<(Box<dyn ObjectWriter>, Written)> {
        let (packing, content_size, content_sha256) = self.inner.finish();
        let stored = packing.finish()?.finish()?;
        let (buffered, size, sha256) = stored.finish();
        let object = buffered.into_inner().map_err(|e| e.into_error())?;
        Ok((object, Written { size, sha256, content_size, content_sha256 }))
    }
}

impl Write for ObjectSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The reading side: a stored object's content, with both ends hashed so
/// the caller can compare them with the manifest once it has read to the end.
pub struct ObjectSource<'a> {
    content: Hashing<Box<dyn Read + 'a>>,
    stored: std::sync::Arc<std::sync::Mutex<(u64, Sha256)>>,
}

/// Hashes what is read into a shared state (the stored end sits under the
/// decryptor and decompressor, which own it).
struct SharedHashing<R> {
    inner: R,
    state: std::sync::Arc<std::sync::Mutex<(u64, Sha256)>>,
}

impl<R: Read> Read for SharedHashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.lock().expect("hash state lock");
        state.0 += n as u64;
        state.1.update(&buf[..n]);
        Ok(n)
    }
}

impl<'a> ObjectSource<'a> {
    /// Read `stored` (an object of backup `id`) as content: decrypted with
    /// `identities` and decompressed.
    pub fn new(
        stored: Box<dyn Read + Send + 'a>,
        compression: Compression,
        encryption: &Encryption,
        identities: &Identities,
        id: &str,
        object: &str,
    ) -> Result<ObjectSource<'a>> {
        let state = std::sync::Arc::new(std::sync::Mutex::new((0u64, Sha256::new())));
        let hashed = SharedHashing { inner: io::BufReader::with_capacity(1 << 20, stored), state: state.clone() };
        let plain = identities.decrypt(hashed, encryption, id, object)?;
        let content: Box<dyn Read + 'a> = match compression {
            Compression::None => plain,
            Compression::Zstd { .. } => Box::new(zstd::Decoder::new(plain).map_err(|e| BackupError::Corrupt {
                id: id.into(),
                object: object.into(),
                detail: format!("starting zstd: {e}"),
            })?),
        };
        Ok(ObjectSource { content: Hashing::new(content), stored: state })
    }

    /// Byte counts and checksums of both ends so far: (stored size,
    /// stored sha256, content size, content sha256).
    pub fn finish(self) -> Written {
        let (_, content_size, content_sha256) = self.content.finish();
        let state = self.stored.lock().expect("hash state lock");
        Written { size: state.0, sha256: hex::encode(state.1.clone().finalize()), content_size, content_sha256 }
    }
}

impl Read for ObjectSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.content.read(buf)
    }
}

/// SHA-256 and size of a whole stream.
pub fn hash_all(mut r: impl Read) -> io::Result<(u64, String)> {
    let mut h = Hashing::new(io::sink());
    io::copy(&mut r, &mut h)?;
    let (_, n, sha) = h.finish();
    Ok((n, sha))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::store::{LocalDir, Store};

    #[test]
    fn what_is_written_reads_back_with_matching_checksums() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalDir::new(tmp.path());
        store.begin("b").unwrap();
        let content: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let key = tmp.path().join("key");
        crate::backup::crypto::write_new_identity(&key).unwrap();
        let ids = Identities::load(&[key.display().to_string()]).unwrap();
        let keys = Keys::parse(&ids.public_keys()).unwrap();
        let compression = Compression::Zstd { level: 3 };

        let mut sink = ObjectSink::new(store.put_object("b", "o").unwrap(), "o", compression, &keys).unwrap();
        sink.write_all(&content).unwrap();
        let (object, written) = sink.finish().unwrap();
        object.commit().unwrap();
        assert_eq!(written.content_size, content.len() as u64);
        assert!(written.size < written.content_size, "compressed: {written:?}");
        let (size, sha) = hash_all(store.get_object("b", "o").unwrap()).unwrap();
        assert_eq!((size, sha.as_str()), (written.size, written.sha256.as_str()));

        let mut source =
            ObjectSource::new(store.get_object("b", "o").unwrap(), compression, &keys.describe(), &ids, "b", "o")
                .unwrap();
        let mut back = Vec::new();
        source.read_to_end(&mut back).unwrap();
        assert!(back == content);
        assert_eq!(source.finish(), written);
    }
}
