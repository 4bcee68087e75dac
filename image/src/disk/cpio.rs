//! A minimal `newc` cpio writer: enough to carry the root squashfs as an
//! extra initrd (the kernel unpacks it into the initramfs).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::Context;

fn pad4(w: &mut impl Write, len: u64) -> io::Result<()> {
    let pad = (4 - (len % 4)) % 4;
    w.write_all(&[0u8; 3][..pad as usize])
}

fn header(w: &mut impl Write, ino: u32, mode: u32, mtime: u64, size: u64, name: &str) -> io::Result<()> {
    let size: u32 = size.try_into().map_err(|_| io::Error::other("newc cpio members are limited to 4 GiB"))?;
    let namesize = name.len() as u32 + 1;
    let fields = [ino, mode, 0, 0, 1, mtime as u32, size, 0, 0, 0, 0, namesize, 0];
    let mut text = String::from("070701");
    for f in fields {
        text.push_str(&format!("{f:08X}"));
    }
    w.write_all(text.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + u64::from(namesize))
}

/// Write `out`: the parent directories of `dest` (an absolute path) and
/// the file `src` at `dest`, all with mtime `epoch`.
pub fn write_single_file(out: &Path, dest: &str, src: &Path, epoch: u64) -> anyhow::Result<()> {
    let mut input = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let size = input.metadata()?.len();
    let mut w =
        BufWriter::with_capacity(1 << 20, File::create(out).with_context(|| format!("creating {}", out.display()))?);
    let rel = dest.trim_start_matches('/');
    let mut ino = 1;
    let parts: Vec<&str> = rel.split('/').collect();
    for i in 1..parts.len() {
        header(&mut w, ino, 0o040755, epoch, 0, &parts[..i].join("/"))?;
        ino += 1;
    }
    header(&mut w, ino, 0o100644, epoch, size, rel)?;
    let copied = io::copy(&mut input, &mut w).with_context(|| format!("copying {}", src.display()))?;
    anyhow::ensure!(copied == size, "{} changed while being copied", src.display());
    pad4(&mut w, size)?;
    header(&mut w, 0, 0, 0, 0, "TRAILER!!!")?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The system `cpio` reads what we write back to the same bytes.
    #[test]
    fn cpio_extracts_to_the_same_file() {
        let Ok(cpio) = which("cpio") else {
            eprintln!("skipping: cpio is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("blob");
        let data: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let out = dir.path().join("x.cpio");
        write_single_file(&out, "/gemin/root.squashfs", &src, 1_700_000_000).unwrap();
        let extract = dir.path().join("x");
        std::fs::create_dir(&extract).unwrap();
        let status = std::process::Command::new(cpio)
            .args(["-i", "-d", "--quiet", "-F"])
            .arg(&out)
            .current_dir(&extract)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(std::fs::read(extract.join("gemin/root.squashfs")).unwrap(), data);
    }

    fn which(name: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.is_file()))
            .ok_or(())
    }
}
