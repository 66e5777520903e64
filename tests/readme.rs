//! The README's Rust example is the crate docs' example (src/lib.rs, "# Example"), which
//! `cargo test --doc` compiles and runs: this keeps the README's copy from drifting from it.

use std::path::Path;

/// The lines of the first fenced block that opens with "```rust", fences included.
fn rust_block(lines: &[String]) -> Vec<String> {
    let start = lines
        .iter()
        .position(|l| l == "```rust")
        .expect("a ```rust block");
    let len = lines[start + 1..]
        .iter()
        .position(|l| l == "```")
        .expect("the block's closing fence");
    lines[start..start + len + 2].to_vec()
}

fn read(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn readme_example_is_the_crate_docs_doctest() {
    let readme: Vec<String> = read("README.md").lines().map(str::to_owned).collect();
    // The crate docs' lines, with their "//! " (or bare "//!") prefix taken off.
    let docs: Vec<String> = read("src/lib.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l).to_owned())
        .collect();
    let (ours, theirs) = (rust_block(&readme), rust_block(&docs));
    assert!(
        ours.len() > 5,
        "README's example is only {} lines",
        ours.len()
    );
    assert_eq!(
        ours, theirs,
        "README.md's ```rust block and src/lib.rs's doc example differ"
    );
}
