//! What a GPU has free, by `nvidia-smi` (the driver's figure, which candle's pool and other
//! processes' memory are already out of): what `train --plan` checks a run against and what
//! `evaluate` sizes its generation batches by.

use anyhow::{bail, Context, Result};

/// The free memory of the run's device, in bytes, and where the figure comes from: a
/// CUDA device's by `nvidia-smi`; None on the CPU (the host's memory is not counted).
pub fn device_memory(device: &str) -> Result<Option<(u64, String)>> {
    let Some(rest) = device.strip_prefix("cuda") else {
        return Ok(None);
    };
    let (total, used) = gpu_memory(rest.strip_prefix(':').unwrap_or("0"))?;
    Ok(Some((
        total.saturating_sub(used),
        format!("free on {device}, by nvidia-smi"),
    )))
}

/// The total and used memory of GPU `index`, in bytes, by `nvidia-smi`.
pub fn gpu_memory(index: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "-i",
            index,
            "--query-gpu=memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .context("cannot run nvidia-smi to read the GPU's memory")?;
    if !out.status.success() {
        bail!(
            "nvidia-smi -i {index}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (total, used) = parse_nvidia_smi(&text)
        .with_context(|| format!("nvidia-smi printed {text:?}; expected 'total, used' in MiB"))?;
    Ok((total << 20, used << 20))
}

/// `total, used` (MiB) of nvidia-smi's CSV line.
fn parse_nvidia_smi(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?;
    let (total, used) = line.split_once(',')?;
    Some((total.trim().parse().ok()?, used.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smis_line_is_read_in_mib() {
        assert_eq!(parse_nvidia_smi("81559, 1024\n"), Some((81559, 1024)));
        assert_eq!(parse_nvidia_smi("[N/A], 3"), None);
        assert_eq!(parse_nvidia_smi(""), None);
    }
}
