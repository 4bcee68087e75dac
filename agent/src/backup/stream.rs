//! The byte pipelines: content → zstd → age → checksum → store when
//! writing, and the reverse when reading, each end counting and hashing;
//! and the progress long operations report from them.

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

/// Tells `tally` how many bytes pass through to `inner`, as they pass
/// (progress; [`Hashing`] keeps the totals that are checked).
pub struct Counting<T, F> {
    inner: T,
    tally: F,
}

impl<T, F: FnMut(u64)> Counting<T, F> {
    pub fn new(inner: T, tally: F) -> Counting<T, F> {
        Counting { inner, tally }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read, F: FnMut(u64)> Read for Counting<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            (self.tally)(n as u64);
        }
        Ok(n)
    }
}

impl<W: Write, F: FnMut(u64)> Write for Counting<W, F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if n > 0 {
            (self.tally)(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The phases of `backup create` and `restore` that report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Bytes read from pg_basebackup; the total, when known, is the
    /// databases' size: an approximation (the tar holds WAL and more).
    Reading,
    /// Content bytes unpacked; the total is the manifest's content size.
    Unpacking,
    /// The backup (a dry run) or the restored files being checked; no count.
    Checking,
    /// Archived WAL files fetched; no total.
    FetchingWal,
    /// PostgreSQL replaying WAL; no count.
    Replaying,
    /// Waiting for the WAL archive to hold a file; no count.
    WaitingForArchive,
}

/// Where long operations report how far they are. The command line draws
/// it on a terminal; `()` ignores it.
pub trait Progress: Send + Sync {
    /// `phase` starts (ending the one before); `total` is its size in its
    /// unit, when known.
    fn begin(&self, phase: Phase, total: Option<u64>);
    /// `n` more units of the current phase are done.
    fn advance(&self, n: u64);
    /// The current phase is over.
    fn end(&self);
    /// Run `f` (which logs) with the display out of its way.
    fn suspend(&self, f: &mut dyn FnMut()) {
        f()
    }
}

impl Progress for () {
    fn begin(&self, _: Phase, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn end(&self) {}
}

impl dyn Progress + '_ {
    /// Begin `phase`; it ends when the returned guard is dropped (on an
    /// error too).
    pub fn phase(&self, phase: Phase, total: Option<u64>) -> Current<'_> {
        self.begin(phase, total);
        Current { progress: self }
    }
}

/// The phase begun by `phase()`; ends it when dropped.
pub struct Current<'p> {
    progress: &'p dyn Progress,
}

impl Current<'_> {
    pub fn advance(&self, n: u64) {
        self.progress.advance(n)
    }
}

impl Drop for Current<'_> {
    fn drop(&mut self) {
        self.progress.end()
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

    #[test]
    fn counting_reports_every_byte_that_passes_and_changes_none() {
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        // Reading in small pieces: each read is told, and they add up.
        let mut told = Vec::new();
        let mut reader = Counting::new(io::Read::chain(&content[..50_000], &content[50_000..]), |n| told.push(n));
        let mut back = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = reader.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            back.extend_from_slice(&chunk[..n]);
        }
        assert!(back == content);
        assert!(told.len() > 1 && !told.contains(&0), "one report a read, none at the end: {told:?}");
        assert_eq!(told.iter().sum::<u64>(), content.len() as u64);

        // Writing: what the inner writer took, even when it takes less than offered.
        struct Short(Vec<u8>);
        impl Write for Short {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let n = buf.len().min(1000);
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut total = 0;
        let mut writer = Counting::new(Short(Vec::new()), |n| total += n);
        writer.write_all(&content).unwrap();
        let written = writer.into_inner().0;
        assert!(written == content);
        assert_eq!(total, content.len() as u64);
    }

    /// Records what a phase reports.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<String>>);

    impl Progress for Recorder {
        fn begin(&self, phase: Phase, total: Option<u64>) {
            self.0.lock().unwrap().push(format!("begin {phase:?} {total:?}"));
        }
        fn advance(&self, n: u64) {
            self.0.lock().unwrap().push(format!("advance {n}"));
        }
        fn end(&self) {
            self.0.lock().unwrap().push("end".into());
        }
    }

    #[test]
    fn a_phase_ends_when_its_guard_goes_also_on_an_error() {
        let recorder = Recorder::default();
        let progress: &dyn Progress = &recorder;
        let read = || -> io::Result<()> {
            let phase = progress.phase(Phase::Unpacking, Some(10));
            let mut input = Counting::new(&b"abc"[..], |n| phase.advance(n));
            io::copy(&mut input, &mut io::sink())?;
            Err(io::Error::other("damaged"))
        };
        assert!(read().is_err());
        assert_eq!(*recorder.0.lock().unwrap(), ["begin Unpacking Some(10)", "advance 3", "end"]);
    }
}
