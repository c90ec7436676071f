//! Bad input: each kind names the file, the line and the field, and leaves nothing behind.

use prepare::assets::Sources;
use prepare::formats::{read_records, Format, ReadSpec};
use std::path::{Path, PathBuf};

fn spec(format: Format, user: &[&str], assistant: Option<&str>) -> ReadSpec {
    ReadSpec {
        format,
        user: user.iter().map(|s| s.to_string()).collect(),
        system: None,
        assistant: assistant.map(str::to_string),
        label: vec![],
        keep_if: None,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn error_of(path: &Path, spec: &ReadSpec) -> String {
    format!("{:#}", read_records(path, spec).unwrap_err())
}

#[test]
fn malformed_json_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"q\": \"a\", \"r\": \"b\"}\n{\"q\": \"a\", \n",
    );
    let e = error_of(&p, &spec(Format::Jsonl, &["q"], Some("r")));
    assert!(e.contains("d.jsonl: line 2: not valid JSON"), "{e}");
}

#[test]
fn missing_field_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"q\": \"a\", \"r\": \"b\"}\n\n{\"q\": \"a\"}\n",
    );
    let e = error_of(&p, &spec(Format::Jsonl, &["q"], Some("r")));
    assert!(e.contains("d.jsonl: line 3: field 'r' is missing"), "{e}");
}

#[test]
fn mistyped_field_says_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.json",
        "[{\"q\": \"a\", \"r\": \"b\"}, {\"q\": 7, \"r\": \"b\"}]",
    );
    let e = error_of(&p, &spec(Format::Json, &["q"], Some("r")));
    assert!(
        e.contains("d.json: record 1 (0-based): field 'q': expected a string, found a number"),
        "{e}"
    );
}

#[test]
fn json_that_is_not_an_array_of_objects() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.json", "{\"q\": \"a\"}");
    let e = error_of(&p, &spec(Format::Json, &["q"], None));
    assert!(
        e.contains("expected a JSON array of objects, found an object"),
        "{e}"
    );
}

#[test]
fn empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "e.csv", "\n  \n");
    let e = error_of(&p, &spec(Format::Csv, &["goal"], None));
    assert!(e.contains("e.csv is empty"), "{e}");
}

#[test]
fn csv_with_missing_column_and_ragged_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "h.csv", "goal,target\nx,y\n");
    let e = error_of(&p, &spec(Format::Csv, &["prompt"], None));
    assert!(
        e.contains("h.csv: line 2: field 'prompt' is missing"),
        "{e}"
    );
    let p = write(dir.path(), "r.csv", "goal,target\nx,y\nonly-one\n");
    let e = error_of(&p, &spec(Format::Csv, &["goal"], None));
    assert!(e.contains("r.csv: line 3: malformed CSV"), "{e}");
}

#[test]
fn unreadable_path_names_it() {
    let e = error_of(
        Path::new("/nonexistent/x.jsonl"),
        &spec(Format::Jsonl, &["q"], None),
    );
    assert!(e.contains("cannot read /nonexistent/x.jsonl"), "{e}");
}

#[test]
fn field_list_with_a_non_string_item() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "p.json", "{\"instructions\": [\"a\", 3]}");
    let e = error_of(&p, &spec(Format::JsonFieldList, &["instructions"], None));
    assert!(
        e.contains("p.json: instructions[1]: expected a string, found a number"),
        "{e}"
    );
    let p = write(dir.path(), "q.json", "{\"instructions\": \"a\"}");
    let e = error_of(&p, &spec(Format::JsonFieldList, &["instructions"], None));
    assert!(
        e.contains("q.json: field 'instructions': expected an array of strings, found a string"),
        "{e}"
    );
}

#[test]
fn unknown_format_in_sources_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "sources.toml",
        "[[asset]]\nname = \"x\"\nrole = \"harmful\"\nfile = \"x.xml\"\nsha256 = \"{}\"\nbytes = 1\nlicence = \"MIT\"\norigin = \"here\"\n[asset.read]\nformat = \"xml\"\nuser = [\"q\"]\n"
            .replace("{}", &"a".repeat(64))
            .as_str(),
    );
    let e = format!("{:#}", Sources::load(&p).unwrap_err());
    assert!(
        e.contains("sources.toml") && e.contains("unknown variant `xml`") && e.contains("format"),
        "{e}"
    );
}

#[test]
fn bad_sources_entries() {
    let dir = tempfile::tempdir().unwrap();
    let entry = |name: &str, role: &str, sha: &str, file: &str| {
        format!("[[asset]]\nname = \"{name}\"\nrole = \"{role}\"\nfile = \"{file}\"\nsha256 = \"{sha}\"\nbytes = 1\nlicence = \"MIT\"\norigin = \"here\"\n")
    };
    let good = "b".repeat(64);
    for (text, want) in [
        (
            entry("x", "nonsense", &good, "x.csv"),
            "role 'nonsense' is not one of",
        ),
        (
            entry("x", "harmful", "abc", "x.csv"),
            "sha256 should be 64 hex digits",
        ),
        (
            entry("x", "harmful", &good, "../x.csv"),
            "must be a relative path inside the cache",
        ),
        (
            entry("x", "harmful", &good, "x.csv") + &entry("x", "harmful", &good, "y.csv"),
            "used twice",
        ),
    ] {
        let p = write(dir.path(), "sources.toml", &text);
        let e = format!("{:#}", Sources::load(&p).unwrap_err());
        assert!(e.contains(want), "{e}");
    }
}
