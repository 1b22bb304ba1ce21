//! A Hugging Face checkpoint directory: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are looked up by name and read lazily from memory maps.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{file_err, ConvertError, Result};
use crate::hf_config::read_json;
use crate::safetensors::{SafetensorsFile, TensorEntry};

pub struct Checkpoint {
    pub dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`, in a stable (file, data) order.
    locate: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens the weights of `dir`, validating every shard header and the index.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = Vec::new();
        let mut locate = BTreeMap::new();
        if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_err(&index_path, "has no \"weight_map\" object"))?;
            let mut shard_ids: HashMap<String, usize> = HashMap::new();
            for (tensor, shard) in map {
                let shard = shard
                    .as_str()
                    .ok_or_else(|| file_err(&index_path, format!("weight_map entry for '{tensor}' is not a file name")))?;
                if shard.contains('/') || shard.contains("..") {
                    return Err(file_err(
                        &index_path,
                        format!("weight_map names shard '{shard}' outside the checkpoint directory"),
                    ));
                }
                let id = match shard_ids.get(shard) {
                    Some(id) => *id,
                    None => {
                        let p = dir.join(shard);
                        if !p.is_file() {
                            return Err(file_err(
                                &index_path,
                                format!("names shard '{shard}' (for tensor '{tensor}'), which does not exist"),
                            ));
                        }
                        files.push(SafetensorsFile::open(&p)?);
                        shard_ids.insert(shard.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[id].entry(tensor).is_none() {
                    let actual = files
                        .iter()
                        .find(|f| f.entry(tensor).is_some())
                        .map(|f| format!(" (it is in {})", f.path().display()))
                        .unwrap_or_default();
                    return Err(ConvertError::Tensor {
                        path: index_path.display().to_string(),
                        tensor: tensor.clone(),
                        what: format!("is mapped to shard '{shard}', which does not hold it{actual}"),
                    });
                }
                locate.insert(tensor.clone(), id);
            }
        } else if single.exists() {
            files.push(SafetensorsFile::open(&single)?);
            for name in files[0].names() {
                locate.insert(name.to_string(), 0);
            }
        } else {
            let bin = dir.join("pytorch_model.bin");
            let what = if bin.exists() || dir.join("pytorch_model.bin.index.json").exists() {
                "holds PyTorch .bin weights; only safetensors checkpoints are supported (re-save with safe_serialization=True)"
            } else {
                "has no model.safetensors or model.safetensors.index.json"
            };
            return Err(file_err(dir, what));
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, locate })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locate.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Option<(&SafetensorsFile, &TensorEntry)> {
        let f = &self.files[*self.locate.get(name)?];
        Some((f, f.entry(name)?))
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.locate.keys().filter_map(|n| self.get(n)).map(|(_, e)| (e.end - e.start) as u64).sum()
    }
}
