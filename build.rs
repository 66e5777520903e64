//! Build script: compiles kernels/*.cu into a static library and generates the FFI bindings of
//! kernels/camex.h, only with feature `cuda`. Without it, nothing CUDA is needed or touched.

use std::env;
use std::path::{Path, PathBuf};

const KERNEL_DIR: &str = "kernels";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    // Without the feature nothing CUDA is needed or touched.
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        #[cfg(feature = "cuda")]
        cuda::build();
    }
}

/// nvcc and its CUDA root: $NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH, then the repo-local
/// install of scripts/setup-cuda.sh (.cuda/nvidia/cu13).
#[allow(dead_code)]
fn find_nvcc() -> Option<(PathBuf, PathBuf)> {
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let root_of = |nvcc: &Path| nvcc.parent().and_then(Path::parent).map(Path::to_path_buf);
    if let Some(n) = env::var_os("NVCC").map(PathBuf::from) {
        if n.is_file() {
            let root = env::var_os("CUDA_HOME")
                .map(PathBuf::from)
                .or_else(|| root_of(&n))?;
            return Some((n, root));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).map(PathBuf::from) {
            let n = home.join("bin").join("nvcc");
            if n.is_file() {
                return Some((n, home));
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let n = dir.join("nvcc");
            if n.is_file() {
                let root = root_of(&n)?;
                return Some((n, root));
            }
        }
    }
    let local = PathBuf::from(env::var("CARGO_MANIFEST_DIR").ok()?).join(".cuda/nvidia/cu13");
    let n = local.join("bin").join("nvcc");
    n.is_file().then_some((n, local))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{find_nvcc, KERNEL_DIR};
    use std::env;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Mutex;

    pub fn build() {
        // docs.rs (and `DOCS_RS=1 cargo doc`) has no CUDA: only the bindings are generated, which
        // need no CUDA header; nothing is compiled or linked, and rustdoc links nothing.
        println!("cargo:rerun-if-env-changed=DOCS_RS");
        if env::var_os("DOCS_RS").is_some() {
            bindings();
            return;
        }
        let Some((nvcc, root)) = find_nvcc() else {
            panic!(
                "feature `cuda`: nvcc not found (looked at $NVCC, $CUDA_HOME/bin, PATH and .cuda/nvidia/cu13). \
                 Run scripts/setup-cuda.sh (installs the pinned CUDA 13.0 nvcc into .cuda/) or set CUDA_HOME."
            );
        };
        let mut sources: Vec<PathBuf> = std::fs::read_dir(KERNEL_DIR)
            .expect("kernels/ directory")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        for entry in std::fs::read_dir(KERNEL_DIR)
            .expect("kernels/ directory")
            .flatten()
        {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }

        println!("cargo:rerun-if-env-changed=CAMEX_KERNEL_EMU");
        let emulate = env::var("CAMEX_KERNEL_EMU").is_ok_and(|v| v == "1");
        if emulate {
            // CPU emulation of the kernels (kernels/emu.h): the host C++ compiler builds the same
            // sources; no device code, no CUDA runtime. Only nvcc's headers are used. The kernel
            // sources get ThreadSanitizer's compile-time instrumentation (a hook before every
            // load and store), which the emulation's runtime defines itself to count shared and
            // global accesses (kernels/emu_runtime.cpp); no sanitizer library is linked.
            let emu_build = || {
                let mut build = cc::Build::new();
                build
                    .cpp(true)
                    .include(KERNEL_DIR)
                    .include(root.join("include"))
                    .define("CAMEX_EMU", None)
                    .flag("-x")
                    .flag("c++")
                    .flag("-std=c++20")
                    // Kernels pun storage types (16-byte vector loads, paired 16-bit fragments)
                    // as CUDA code does; the host compiler must not optimise on strict aliasing.
                    .flag("-fno-strict-aliasing")
                    .flag("-pthread")
                    .opt_level(2)
                    .warnings(false);
                build
            };
            let mut kernels = emu_build();
            kernels
                .flag("-fsanitize=thread")
                .flag("--param=tsan-instrument-func-entry-exit=0");
            for s in &sources {
                kernels.file(s);
            }
            kernels.compile("camex_kernels");
            let runtime = PathBuf::from(KERNEL_DIR).join("emu_runtime.cpp");
            emu_build().file(runtime).compile("camex_emu_runtime");
            println!("cargo:rustc-link-lib=dylib=pthread");
        } else {
            build_device(&nvcc, &root, &sources);
        }
        bindings();
    }

    /// kernels/camex.h as Rust (src/ffi.rs includes it).
    fn bindings() {
        let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
        let bindings = bindgen::Builder::default()
            .header(format!("{KERNEL_DIR}/camex.h"))
            .allowlist_function("camex_.*")
            .allowlist_type("camex_.*")
            .allowlist_var("CAMEX_.*")
            .default_enum_style(bindgen::EnumVariation::Consts)
            .derive_default(true)
            .layout_tests(true)
            .generate()
            .expect("bindgen: kernels/camex.h");
        bindings
            .write_to_file(out.join("camex_bindings.rs"))
            .expect("write camex_bindings.rs");
    }

    /// The `-gencode` targets: by default a fatbin of sm_80 and sm_90 SASS plus compute_90 PTX
    /// (JIT-compiled on newer GPUs); with `CUDA_COMPUTE_CAP=XY` (as candle's build reads it) only
    /// sm_XY SASS and compute_XY PTX, which builds faster for the one GPU at hand.
    fn gencodes() -> Vec<String> {
        println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
        let Ok(cap) = env::var("CUDA_COMPUTE_CAP") else {
            return vec![
                "arch=compute_80,code=sm_80".into(),
                "arch=compute_90,code=sm_90".into(),
                "arch=compute_90,code=compute_90".into(),
            ];
        };
        // "90", "9.0", "sm_90" and "90a" all name the same capability (the suffix is kept).
        let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
        let digits = cap.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        if !digits.parse::<u32>().is_ok_and(|d| d >= 80) {
            panic!(
                "CUDA_COMPUTE_CAP={cap:?}: expected a compute capability of 8.0 or newer, such as 80, \
                 86, 89 or 90 (the kernels use sm_80 features)"
            );
        }
        vec![
            format!("arch=compute_{cap},code=sm_{cap}"),
            format!("arch=compute_{cap},code=compute_{cap}"),
        ]
    }

    /// One kernel source to an object; returns nvcc's stderr (ptxas' `-v` report).
    fn nvcc_compile(nvcc: &Path, gencodes: &[String], src: &Path, obj: &Path) -> String {
        let mut cmd = Command::new(nvcc);
        cmd.args(["-std=c++17", "-O3", "-I", KERNEL_DIR])
            .args(["-Xcompiler", "-fPIC,-ffunction-sections,-fdata-sections"]);
        for g in gencodes {
            cmd.arg("-gencode").arg(g);
        }
        cmd.args(["-Xptxas", "-v", "-c"])
            .arg(src)
            .arg("-o")
            .arg(obj);
        let run = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        let report = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(
            run.status.success(),
            "nvcc failed on {} ({}):\n{report}",
            src.display(),
            run.status
        );
        report
    }

    /// nvcc on every kernel source, one process per file and up to cargo's job count at once,
    /// heaviest first (cc's `Build` runs them one after another, and as relocatable device code,
    /// which no kernel needs: each .cu is a whole program with its launchers, so ptxas sees every
    /// kernel whole). ptxas' `-v` report (registers, stack, spills of each kernel per arch) is kept
    /// as OUT_DIR/ptxas.log: `scripts/check-ptxas.sh --from-build` reads it instead of compiling
    /// every kernel again.
    fn build_device(nvcc: &Path, root: &Path, sources: &[PathBuf]) {
        let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
        let jobs = env::var("NUM_JOBS")
            .ok()
            .and_then(|j| j.parse::<usize>().ok())
            .unwrap_or(1)
            .clamp(1, sources.len().max(1));
        // The largest source (the tensor-core curvature kernels) takes half the time: start it first.
        let mut order: Vec<&PathBuf> = sources.iter().collect();
        order.sort_by_key(|s| std::cmp::Reverse(std::fs::metadata(s).map_or(0, |m| m.len())));
        let gencodes = gencodes();
        let queue = Mutex::new(order.into_iter());
        let reports = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                scope.spawn(|| loop {
                    let Some(src) = queue.lock().unwrap().next() else {
                        break;
                    };
                    let obj = out.join(src.file_name().unwrap()).with_extension("o");
                    let report = nvcc_compile(nvcc, &gencodes, src, &obj);
                    reports.lock().unwrap().push((src.clone(), obj, report));
                });
            }
        });
        let mut reports = reports.into_inner().unwrap();
        reports.sort();
        let log: String = reports.iter().map(|(_, _, r)| r.as_str()).collect();
        std::fs::write(out.join("ptxas.log"), log).expect("write ptxas.log");
        let mut archive = Command::new(nvcc);
        archive
            .arg("--lib")
            .arg("-o")
            .arg(out.join("libcamex_kernels.a"))
            .args(reports.iter().map(|(_, obj, _)| obj));
        let status = archive.status().expect("nvcc --lib");
        assert!(status.success(), "{archive:?} failed: {status}");
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=camex_kernels");

        let lib = root.join("lib");
        let lib64 = root.join("lib64");
        let libdir = if lib.join("libcudart_static.a").is_file() {
            lib
        } else {
            lib64
        };
        println!("cargo:rustc-link-search=native={}", libdir.display());
        println!("cargo:rustc-link-lib=static=cudart_static");
        for l in ["dl", "rt", "pthread", "stdc++"] {
            println!("cargo:rustc-link-lib=dylib={l}");
        }
    }
}
