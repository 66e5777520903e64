//! A static check, runnable without a GPU, that the crate's device-to-device copies all go through
//! one counted function (`camex::cuda::copy_dtod`, read by `camex::cuda::device_copies`), that
//! the one caller is the CUDA backend's `pack` (its fallback for pieces that are not one op's
//! packed output; the ops' own packed gradients come home without it, as the note in
//! `src/candle/cuda.rs` says), and that the candle adapter copies nothing itself. The burn
//! adapter on CUDA (`src/burn/cube.rs`) copies each output into CubeCL's memory through the
//! second counted function, `copy_dtod_raw` (raw device pointers).
//! `tests/candle_cuda.rs` counts the copies of the candle ops on a GPU.

use std::path::Path;

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push((
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            ));
        }
    }
}

/// Lines of code (comments stripped) that contain `needle`, as `file:line`.
fn uses(files: &[(String, String)], needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for (f, text) in files {
        for (k, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if code.contains(needle) {
                hits.push(format!("{f}:{}", k + 1));
            }
        }
    }
    hits
}

#[test]
fn every_device_copy_goes_through_the_counted_wrapper() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    assert!(files.len() > 10, "found only {} source files", files.len());
    // cudarc's device-to-device copies (and the driver's) appear only inside `copy_dtod` and
    // `copy_dtod_raw`, both in src/cuda/mod.rs.
    for needle in [
        "memcpy_dtod",
        "clone_dtod",
        "cuMemcpyDtoD",
        "memcpy_peer",
        "cuMemcpyAsync",
    ] {
        let hits = uses(&files, needle);
        let allowed = needle == "memcpy_dtod"
            && hits.len() <= 2
            && hits.iter().all(|h| h.contains("src/cuda/mod.rs"));
        assert!(
            hits.is_empty() || allowed,
            "`{needle}` outside camex::cuda::copy_dtod: {hits:?}"
        );
    }
    // The wrapper counts before it copies.
    let cuda = std::fs::read_to_string(root.join("src/cuda/mod.rs")).unwrap();
    let body = cuda
        .split("pub(crate) fn copy_dtod")
        .nth(1)
        .expect("copy_dtod exists");
    let body = &body[..body.find("\n}\n").expect("copy_dtod ends")];
    assert!(
        body.contains("DEVICE_COPIES.with"),
        "copy_dtod does not count"
    );
    // The raw one counts too, and only the burn CUDA adapter calls it.
    let raw = cuda
        .split("pub(crate) unsafe fn copy_dtod_raw")
        .nth(1)
        .expect("copy_dtod_raw exists");
    let raw = &raw[..raw.find("\n}\n").expect("copy_dtod_raw ends")];
    assert!(
        raw.contains("DEVICE_COPIES.with") && raw.contains("memcpy_dtod"),
        "copy_dtod_raw does not count"
    );
    let raw_calls: Vec<String> = uses(&files, "copy_dtod_raw(")
        .into_iter()
        .filter(|h| !h.contains("src/cuda/mod.rs"))
        .collect();
    assert!(
        raw_calls.iter().all(|h| h.contains("src/burn/cube.rs")),
        "{raw_calls:?}"
    );
    // One caller: the CUDA backend's `pack` (the backward's packed gradient). The candle adapter
    // and everything else never copy, so the forward's and the backward's inputs are read in place.
    let calls: Vec<String> = uses(&files, "copy_dtod(")
        .into_iter()
        .filter(|h| !h.contains("src/cuda/mod.rs"))
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].contains("src/cuda/backend.rs"), "{calls:?}");
    let backend = std::fs::read_to_string(root.join("src/cuda/backend.rs")).unwrap();
    let pack = backend.split("fn pack(").nth(1).expect("pack exists");
    let pack = &pack[..pack.find("\n    }\n").expect("pack ends")];
    assert!(
        pack.contains("copy_dtod("),
        "the backend copies outside pack"
    );
}
