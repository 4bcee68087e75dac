//! What the image file is: a raw disk (with or without a GPT), or something
//! that must be converted or unpacked first. Pure checks over the first
//! bytes of the file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::FlashError;

/// How many bytes of the image the checks look at: enough for a GPT header
/// on 4096-byte sectors (LBA 1 at byte 4096).
pub const HEADER_BYTES: usize = 4096 + 512;

/// The signature of a GPT header, at the start of LBA 1.
pub const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";

/// The qcow2 magic: `QFI\xfb`.
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// What the first bytes of an image say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A raw disk image.
    Raw,
    /// A container format a disk cannot boot from as is.
    Qcow2,
    Vmdk,
    Vhdx,
    /// A compressed file.
    Gzip,
    Xz,
    Zstd,
}

impl Kind {
    /// What to run to get a raw image from this one, `None` for raw.
    pub fn hint(self, image: &Path) -> Option<String> {
        let path = image.display();
        let raw = image.with_extension("raw");
        let raw = raw.display();
        let convert = |fmt: &str| format!("convert it first: `qemu-img convert -f {fmt} -O raw {path} {raw}`");
        match self {
            Kind::Raw => None,
            Kind::Qcow2 => Some(convert("qcow2")),
            Kind::Vmdk => Some(convert("vmdk")),
            Kind::Vhdx => Some(convert("vhdx")),
            Kind::Gzip => Some(format!("decompress it first: `gunzip --keep {path}`")),
            Kind::Xz => Some(format!("decompress it first: `unxz --keep {path}`")),
            Kind::Zstd => Some(format!("decompress it first: `unzstd {path}`")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Qcow2 => "qcow2",
            Kind::Vmdk => "VMDK",
            Kind::Vhdx => "VHDX",
            Kind::Gzip => "gzip-compressed",
            Kind::Xz => "xz-compressed",
            Kind::Zstd => "zstd-compressed",
        }
    }
}

/// Classify an image by its first bytes.
pub fn classify(header: &[u8]) -> Kind {
    if header.starts_with(QCOW2_MAGIC) {
        Kind::Qcow2
    } else if header.starts_with(b"KDMV") {
        Kind::Vmdk
    } else if header.starts_with(b"vhdxfile") {
        Kind::Vhdx
    } else if header.starts_with(&[0x1f, 0x8b]) {
        Kind::Gzip
    } else if header.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Kind::Xz
    } else if header.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Kind::Zstd
    } else {
        Kind::Raw
    }
}

/// The sector size the image's GPT was written for (the header sits at LBA
/// 1), or `None` when neither 512 nor 4096 holds one.
pub fn gpt_sector_size(header: &[u8]) -> Option<u64> {
    [512u64, 4096].into_iter().find(|&sector| {
        let at = sector as usize;
        header.get(at..at + GPT_SIGNATURE.len()) == Some(GPT_SIGNATURE.as_slice())
    })
}

/// A raw image, checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// Sector size of the GPT found at LBA 1; `None` without a GPT (only
    /// accepted with `--force`).
    pub gpt_sector_size: Option<u64>,
}

/// Open and check the image: a non-empty regular file in raw format, with a
/// GPT unless `force`.
pub fn inspect(path: &Path, force: bool) -> Result<ImageInfo, FlashError> {
    let io = |source| FlashError::Io { what: format!("reading the image {}", path.display()), error: source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(FlashError::ImageNotAFile { image: path.to_path_buf() });
    }
    if meta.len() == 0 {
        return Err(FlashError::ImageEmpty { image: path.to_path_buf() });
    }
    let mut header = Vec::with_capacity(HEADER_BYTES);
    File::open(path).map_err(io)?.take(HEADER_BYTES as u64).read_to_end(&mut header).map_err(io)?;
    let kind = classify(&header);
    if let Some(hint) = kind.hint(path) {
        return Err(FlashError::NotRaw { image: path.to_path_buf(), kind: kind.name(), hint });
    }
    let gpt_sector_size = gpt_sector_size(&header);
    if gpt_sector_size.is_none() && !force {
        return Err(FlashError::NoGpt { image: path.to_path_buf() });
    }
    Ok(ImageInfo { path: path.to_path_buf(), bytes: meta.len(), gpt_sector_size })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_gpt_at(sector: usize) -> Vec<u8> {
        let mut header = vec![0u8; HEADER_BYTES];
        header[510] = 0x55;
        header[511] = 0xaa;
        header[sector..sector + 8].copy_from_slice(GPT_SIGNATURE);
        header
    }

    #[test]
    fn formats_are_told_apart_by_their_magic() {
        assert_eq!(classify(b"QFI\xfb\0\0\0\x03"), Kind::Qcow2);
        assert_eq!(classify(b"KDMV\x01\0\0\0"), Kind::Vmdk);
        assert_eq!(classify(b"vhdxfile"), Kind::Vhdx);
        assert_eq!(classify(&[0x1f, 0x8b, 8, 0]), Kind::Gzip);
        assert_eq!(classify(&[0xfd, b'7', b'z', b'X', b'Z', 0]), Kind::Xz);
        assert_eq!(classify(&[0x28, 0xb5, 0x2f, 0xfd]), Kind::Zstd);
        assert_eq!(classify(&with_gpt_at(512)), Kind::Raw);
        assert_eq!(classify(&[]), Kind::Raw);
    }

    #[test]
    fn the_qcow2_hint_names_the_conversion() {
        let hint = Kind::Qcow2.hint(Path::new("out/disk.qcow2")).unwrap();
        assert_eq!(hint, "convert it first: `qemu-img convert -f qcow2 -O raw out/disk.qcow2 out/disk.raw`");
        assert_eq!(Kind::Raw.hint(Path::new("x")), None);
    }

    #[test]
    fn the_gpt_header_is_found_at_lba_1() {
        assert_eq!(gpt_sector_size(&with_gpt_at(512)), Some(512));
        assert_eq!(gpt_sector_size(&with_gpt_at(4096)), Some(4096));
        assert_eq!(gpt_sector_size(&with_gpt_at(1024)), None);
        assert_eq!(gpt_sector_size(&[0u8; 600]), None);
        // A header cut short is no header.
        assert_eq!(gpt_sector_size(&with_gpt_at(512)[..515]), None);
    }
}
