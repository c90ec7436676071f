//! Small file helpers: content hashes and writes that never leave half a file behind.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

/// Hex sha256 of a file's bytes, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sha256_reader(&mut file).with_context(|| format!("cannot read {}", path.display()))
}

/// Hex sha256 of everything `reader` yields.
pub fn sha256_reader(reader: &mut impl Read) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of bytes in memory.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The sha256 of a model's weights: the .gguf file, a directory's one .safetensors file,
/// or for a sharded directory the sha256 of its "file sha256" lines (sorted by name).
pub fn weights_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    match files.as_slice() {
        [] => anyhow::bail!("{}: no .safetensors weights", path.display()),
        [one] => sha256_file(one),
        shards => {
            let mut lines = String::new();
            for f in shards {
                let name = f
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().to_string());
                lines.push_str(&format!("{name} {}\n", sha256_file(f)?));
            }
            Ok(sha256_bytes(lines.as_bytes()))
        }
    }
}

/// Writes `path` through a temporary file in the same directory, renamed into place only
/// when `write` succeeded: readers see the old file or the whole new one, never a part.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut std::fs::File) -> Result<()>,
{
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = staged_file(dir)?;
    write(tmp.as_file_mut())?;
    publish(tmp, path)
}

/// A temporary file in `dir` (`.basin-*.tmp`, removed when dropped) to be [`publish`]ed:
/// for outputs written in several steps that must appear whole or not at all.
pub fn staged_file(dir: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".basin-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

/// Moves a finished [`staged_file`] to `path` (flushed, synced, mode 0644).
pub fn publish(mut tmp: tempfile::NamedTempFile, path: &Path) -> Result<()> {
    // Temporary files are private (0600); the finished file gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    }
    tmp.as_file_mut()
        .flush()
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot flush the temporary file for {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot move the finished file to {}", path.display()))?;
    Ok(())
}

/// Replaces directory `dir` whole: `fill` writes a fresh directory beside it, which is
/// renamed into place only when `fill` succeeded (the old one is moved aside first, then
/// removed). A failed `fill` leaves `dir` as it was and removes its partial work.
pub fn replace_dir<F>(dir: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("cannot move {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("cannot move the new {} into place", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// A JSON file read whole, with the path in both errors (unreadable, not valid JSON).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// [`write_atomic`] for bytes already in memory.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| {
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Finds a fetched asset file (path relative to the cache, as in data/sources.toml):
/// `<root>/data/cache/<rel>`, then `$DATA_MIRROR/<rel>`. Tests use it to find real data.
pub fn locate_asset(root: &Path, rel: &str) -> Option<std::path::PathBuf> {
    let cached = root.join("data/cache").join(rel);
    if cached.is_file() {
        return Some(cached);
    }
    let mirrored = std::path::PathBuf::from(std::env::var_os("DATA_MIRROR")?).join(rel);
    mirrored.is_file().then_some(mirrored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn failed_atomic_write_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |f| {
            f.write_all(b"half")?;
            anyhow::bail!("boom")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "temporary file left behind");
        assert_eq!(sha256_file(&path).unwrap(), sha256_bytes(b"old"));
    }
}
