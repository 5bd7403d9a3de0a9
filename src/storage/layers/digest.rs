//! sha256 digests as the OCI spec writes them (`sha256:<hex>`), DiffIDs and ChainIDs, and
//! readers/writers that hash what goes through them.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

/// `sha256:<64 hex>`.
pub fn sha256_str(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a `sha256:<hex>` digest, if it is one.
pub fn hex_part(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(h)
}

/// ChainID as the image spec defines it: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(L0|..|Ln) = sha256(ChainID(L0|..|Ln-1) + " " + DiffID(Ln))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_str(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Hashes and counts what is read through it, and remembers the last 512 bytes (a tar that
/// ends cleanly ends in a zero block).
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub count: u64,
    tail: [u8; 512],
    tail_len: usize,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            tail: [0; 512],
            tail_len: 0,
        }
    }

    /// Were the last 512 bytes read all zero (an end-of-archive block)?
    pub fn ends_in_zero_block(&self) -> bool {
        self.tail_len == 512 && self.tail.iter().all(|b| *b == 0)
    }

    pub fn digest(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let got = &buf[..n];
        self.hasher.update(got);
        self.count += n as u64;
        if n >= 512 {
            self.tail.copy_from_slice(&got[n - 512..]);
            self.tail_len = 512;
        } else if n > 0 {
            self.tail.copy_within(n.., 0);
            self.tail[512 - n..].copy_from_slice(got);
            self.tail_len = (self.tail_len + n).min(512);
        }
        Ok(n)
    }
}

/// Hashes and counts what is written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    pub count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub fn finish(self) -> (W, String) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_follows_the_spec() {
        let a = sha256_str(b"a");
        let b = sha256_str(b"b");
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_str(format!("{a} {b}").as_bytes()));
        assert_ne!(ids[1], b);
    }

    #[test]
    fn tail_tracks_small_reads() {
        let mut data = vec![7u8; 600];
        data.extend(std::iter::repeat_n(0u8, 512));
        let mut r = HashingReader::new(&data[..]);
        let mut buf = [0u8; 100];
        while r.read(&mut buf).unwrap() > 0 {}
        assert!(r.ends_in_zero_block());
        let mut r = HashingReader::new(&data[..1000]);
        while r.read(&mut buf).unwrap() > 0 {}
        assert!(!r.ends_in_zero_block());
        assert_eq!(r.count, 1000);
    }
}
