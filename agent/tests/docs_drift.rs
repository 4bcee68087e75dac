//! The committed generated docs match the code: run `just docs` after
//! changing the CLI or the cloud-config schema.

use std::path::Path;

#[test]
fn generated_docs_are_up_to_date() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let mut stale = Vec::new();
    for (rel, contents) in geminik8s::cli::docs::generated().unwrap() {
        let path = docs.join(&rel);
        if std::fs::read(&path).ok().as_deref() != Some(contents.as_slice()) {
            stale.push(rel.display().to_string());
        }
    }
    assert!(stale.is_empty(), "docs out of date (run `just docs`): {}", stale.join(", "));
}
