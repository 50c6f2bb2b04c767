//! The faults an agent's admin API injects into a simulated GPU (`POST /inject`), by the names
//! `flotilla-agent inject --fault` and `kubectl flotilla inject --fault` take.

/// The JSON `fault` of `POST /inject` for a fault named on a command line: `double_bit_ecc`,
/// `ecc_storm`, `gpu_lost`, `overheat`, `recover`, `hang`, `hang_collective`, or
/// `slow=PERCENT` (steps take PERCENT/100 times as long).
pub fn fault_body(name: &str) -> Result<serde_json::Value, String> {
    match name.split_once('=') {
        Some(("slow", percent)) => match percent.parse::<u32>() {
            Ok(p) if p > 100 => Ok(serde_json::json!({ "slow": p })),
            _ => Err(format!(
                "--fault slow=PERCENT: expected a whole number above 100, got {percent:?}"
            )),
        },
        Some((other, _)) => Err(format!("--fault: only slow takes a value, got {other:?}")),
        None => Ok(serde_json::Value::String(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_admin_api_bodies() {
        assert_eq!(fault_body("hang").unwrap(), serde_json::json!("hang"));
        assert_eq!(fault_body("slow=400").unwrap(), serde_json::json!({"slow": 400}));
        assert!(fault_body("slow=fast").unwrap_err().contains("got \"fast\""));
        assert!(fault_body("slow=50").is_err());
        assert!(fault_body("hang=3").is_err());
    }
}
