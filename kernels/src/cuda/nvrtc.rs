//! NVRTC: finding the library, compiling a kernel file to PTX (CI's check) or to a CUBIN (what the
//! runtime loads), and the on-disk cache of compiled kernels.
//!
//! `libnvrtc` is looked for, in order: the file or folder in `MOELLAVA_NVRTC`; the loader's own search
//! (`LD_LIBRARY_PATH`, the system's CUDA); the `nvidia-cuda-nvrtc-cu12` wheel in the active Python
//! environment (`VIRTUAL_ENV`) or in `./.venv` (what `make setup` installs for CI's kernel check);
//! `/usr/local/cuda/lib64`. A library found by path is opened once and kept open, so that cudarc's
//! own `dlopen("libnvrtc.so.12")` resolves to it by its soname.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc as cu_nvrtc;

/// Environment variable naming `libnvrtc.so*` (or its folder).
pub const NVRTC_ENV: &str = "MOELLAVA_NVRTC";
/// Environment variable naming the folder of compiled kernels (default `$XDG_CACHE_HOME/moellava/ptx`
/// or `~/.cache/moellava/ptx`).
pub const CACHE_ENV: &str = "MOELLAVA_PTX_CACHE";

/// Folders that may hold the library, after the loader's own search.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let venvs = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).into_iter().chain([PathBuf::from(".venv")]);
    for venv in venvs {
        if let Ok(entries) = std::fs::read_dir(venv.join("lib")) {
            for e in entries.flatten() {
                dirs.push(e.path().join("site-packages/nvidia/cuda_nvrtc/lib"));
            }
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// The library file in `p` (itself when it is a file).
fn library_in(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(p)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("libnvrtc.so") && !name.contains("builtins") && !name.contains(".alt.")
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Makes `libnvrtc` loadable, or says where it was looked for.
pub fn load() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(find_and_open).clone()
}

fn find_and_open() -> Result<(), String> {
    if let Some(p) = std::env::var_os(NVRTC_ENV).map(PathBuf::from) {
        return match library_in(&p) {
            Some(lib) => open_and_keep(&lib),
            None => Err(format!("{NVRTC_ENV}={} is neither libnvrtc.so* nor a folder holding it", p.display())),
        };
    }
    // SAFETY: probing only dlopens cudarc's candidate names and closes them again.
    if unsafe { cu_nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    let mut tried = vec!["the loader's search path (LD_LIBRARY_PATH, ldconfig)".to_string()];
    for dir in candidate_dirs() {
        if let Some(lib) = library_in(&dir) {
            return open_and_keep(&lib);
        }
        tried.push(dir.display().to_string());
    }
    Err(format!(
        "libnvrtc not found (looked in: {}); install the CUDA toolkit or `pip install nvidia-cuda-nvrtc-cu12`, \
         or set {NVRTC_ENV} to the library's path",
        tried.join(", ")
    ))
}

/// Opens `lib` and never closes it: cudarc's later `dlopen` of the soname then finds it loaded.
fn open_and_keep(lib: &Path) -> Result<(), String> {
    // SAFETY: libnvrtc's initialisers have no preconditions; the handle is leaked on purpose so the
    // library stays mapped for the life of the process (cudarc keeps function pointers into it).
    let handle = unsafe { libloading::Library::new(lib) }.map_err(|e| format!("cannot load {}: {e}", lib.display()))?;
    std::mem::forget(handle);
    // SAFETY: as above, a dlopen probe.
    if unsafe { cu_nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(format!(
            "loaded {} but cudarc still cannot open libnvrtc by name (it asks for libnvrtc.so or libnvrtc.so.12: \
             put a `libnvrtc.so` link to this file in a folder on LD_LIBRARY_PATH)",
            lib.display()
        ))
    }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), String> {
    load()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded (above); nvrtcVersion writes two ints through valid pointers.
    unsafe { cu_nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// Compiles one kernel file (`name`, its `source` without the shared prelude) to PTX for the virtual
/// architecture `compute_{arch}` (e.g. 90 for Hopper): what CI checks. Errors carry NVRTC's log.
pub fn compile(name: &str, source: &str, arch: u32) -> Result<String, String> {
    let ptx = nvrtc_compile(name, source, &format!("compute_{arch}"), Output::Ptx)?;
    // NVRTC's PTX is NUL-terminated text.
    Ok(String::from_utf8_lossy(ptx.split(|b| *b == 0).next().unwrap_or(&[])).into_owned())
}

/// Compiles one kernel file to a CUBIN (machine code) for the real architecture `sm_{arch}`: what
/// the runtime loads, because a CUBIN from a newer NVRTC still loads on an older driver of the same
/// CUDA major version, where PTX of a newer ISA would be refused.
pub fn compile_cubin(name: &str, source: &str, arch: u32) -> Result<Vec<u8>, String> {
    nvrtc_compile(name, source, &format!("sm_{arch}"), Output::Cubin)
}

enum Output {
    Ptx,
    Cubin,
}

/// One NVRTC compilation of `name` (the shared prelude + `source`) for `--gpu-architecture=gpu_arch`.
fn nvrtc_compile(name: &str, source: &str, gpu_arch: &str, out: Output) -> Result<Vec<u8>, String> {
    use std::ffi::CString;
    load()?;
    let src = CString::new(super::program(source)).map_err(|_| format!("{name}: NUL byte in the source"))?;
    let cname = CString::new(name).map_err(|_| format!("{name}: NUL byte in the name"))?;
    let prog = cu_nvrtc::result::create_program(&src, Some(&cname)).map_err(|e| format!("NVRTC failed on {name}: {e:?}"))?;
    let opts = [format!("--gpu-architecture={gpu_arch}"), "--std=c++17".into(), "-default-device".into()];
    // SAFETY: `prog` was created above and is destroyed once, at the end; `src` and `cname` outlive it;
    // the output buffer is sized by nvrtcGet{PTX,CUBIN}Size before nvrtcGet{PTX,CUBIN} writes into it.
    unsafe {
        let r = match cu_nvrtc::result::compile_program(prog, &opts) {
            Err(_) => {
                let log = cu_nvrtc::result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
                Err(format!("NVRTC could not compile {name} for {gpu_arch}:\n{}", String::from_utf8_lossy(&log)))
            }
            Ok(()) => {
                let (mut size, what) = (
                    0usize,
                    match out {
                        Output::Ptx => "PTX",
                        Output::Cubin => "CUBIN",
                    },
                );
                let sized = match out {
                    Output::Ptx => cu_nvrtc::sys::nvrtcGetPTXSize(prog, &mut size),
                    Output::Cubin => cu_nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size),
                };
                let mut bin = vec![0u8; size];
                let got = sized.result().and_then(|()| {
                    let p = bin.as_mut_ptr() as *mut std::ffi::c_char;
                    match out {
                        Output::Ptx => cu_nvrtc::sys::nvrtcGetPTX(prog, p),
                        Output::Cubin => cu_nvrtc::sys::nvrtcGetCUBIN(prog, p),
                    }
                    .result()
                });
                got.map(|()| bin).map_err(|e| format!("{name}: reading NVRTC's {what}: {e:?}"))
            }
        };
        let _ = cu_nvrtc::result::destroy_program(prog);
        r
    }
}

/// Whether a CUBIN (an ELF image) names the kernel `name` (its symbol table holds the name as a
/// NUL-terminated string).
pub fn cubin_defines(cubin: &[u8], name: &str) -> bool {
    let needle: Vec<u8> = name.bytes().chain([0]).collect();
    cubin
        .windows(needle.len())
        .enumerate()
        .any(|(i, w)| w == needle.as_slice() && (i == 0 || cubin[i - 1] == 0 || cubin[i - 1] == b'.'))
}

/// Names of the kernels (`.entry`) a PTX text defines.
pub fn entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry "))?;
            Some(rest.split(|c: char| c == '(' || c.is_whitespace()).next()?.to_string())
        })
        .collect()
}

/// 64-bit FNV-1a: a stable cache key (std's hashers may change between Rust releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(CACHE_ENV) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("moellava").join("ptx"))
}

/// [`compile_cubin`], through a disk cache keyed by the program text, the architecture and NVRTC's
/// version. A cache that cannot be read or written is skipped (compiled again), never an error.
pub fn cached_cubin(name: &str, source: &str, arch: u32) -> Result<Vec<u8>, String> {
    let (major, minor) = version()?;
    let key = fnv1a(&[super::program(source).as_bytes(), &arch.to_le_bytes(), &major.to_le_bytes(), &minor.to_le_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("{}-sm{arch}-{key:016x}.cubin", name.trim_end_matches(".cu"))));
    if let Some(bin) = path.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| !b.is_empty()) {
        return Ok(bin);
    }
    let ptx = compile_cubin(name, source, arch)?;
    if let Some(path) = path {
        // Write-then-rename, so a concurrent reader never sees half a file.
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_from_ptx_text() {
        let ptx = ".version 8.8\n.target compute_90\n.visible .entry matvec_q4_0(\n\t.param .u64 a\n)\n.entry local_one(\n";
        assert_eq!(entries(ptx), vec!["matvec_q4_0", "local_one"]);
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"x", &90u32.to_le_bytes()]), fnv1a(&[b"x", &80u32.to_le_bytes()]));
    }
}
