//! The NVML C ABI: every function the agent's NVML backend calls, with the structs of
//! `nvml-wrapper-sys` (bindgen's rendering of `nvml.h`), so layouts agree with what the wrapper
//! expects. Handles are small integers dressed as pointers; nothing here is dereferenced but the
//! caller's out-parameters.
//!
//! Functions the agent does not call are absent: `nvml-wrapper` then reports a missing symbol
//! for them, as it would against an older driver. Functions the agent calls that Hopper GPUs do
//! not support (page retirement, which row remapping replaced) answer NOT_SUPPORTED, as a real
//! H100 does.

#![allow(non_snake_case)]

use crate::control;
use crate::gpus::{Gpu, InitOutcome, NVSWITCHES, Node, event_type};
use nvml_wrapper_sys::bindings::{
    field_id as fi, nvmlDevice_st, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_st, nvmlEventSet_t,
    nvmlFieldValue_t, nvmlMemory_v2_t, nvmlPciInfo_t, nvmlReturn_t, nvmlUtilization_t, nvmlValue_t,
};
use std::ffi::{c_char, c_int, c_uint, c_ulonglong};
use std::time::{Duration, Instant, SystemTime};

// nvmlReturn_t values (nvml.h).
const SUCCESS: nvmlReturn_t = 0;
const UNINITIALIZED: nvmlReturn_t = 1;
const INVALID_ARGUMENT: nvmlReturn_t = 2;
const NOT_SUPPORTED: nvmlReturn_t = 3;
const NO_PERMISSION: nvmlReturn_t = 4;
const INSUFFICIENT_SIZE: nvmlReturn_t = 7;
const DRIVER_NOT_LOADED: nvmlReturn_t = 9;
const TIMEOUT: nvmlReturn_t = 10;
const GPU_IS_LOST: nvmlReturn_t = 15;
const ARGUMENT_VERSION_MISMATCH: nvmlReturn_t = 25;
const UNKNOWN: nvmlReturn_t = 999;

// nvmlValueType_t values.
const VALUE_UINT: c_uint = 1;
const VALUE_ULL: c_uint = 3;

/// How often a waiting `nvmlEventSetWait_v2` looks at the command file.
const EVENT_POLL: Duration = Duration::from_millis(50);
const DEVICE_BASE: usize = 0x1000;
const SET_BASE: usize = 0x10_0000;

fn device_handle(index: u32) -> nvmlDevice_t {
    std::ptr::without_provenance_mut::<nvmlDevice_st>(DEVICE_BASE + index as usize)
}

fn device_index(handle: nvmlDevice_t) -> Option<usize> {
    handle.addr().checked_sub(DEVICE_BASE)
}

fn set_handle(id: usize) -> nvmlEventSet_t {
    std::ptr::without_provenance_mut::<nvmlEventSet_st>(SET_BASE + id)
}

/// Writes `value` to the caller's out-parameter.
fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: NVML's contract: a non-null out-parameter points to a writable, aligned `T` the
    // caller owns for the duration of the call; null was refused above.
    unsafe { out.write(value) };
    SUCCESS
}

/// Copies `text` NUL-terminated into `buf` of `len` bytes; INSUFFICIENT_SIZE when it does not fit.
fn put_str(buf: *mut c_char, len: c_uint, text: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    if text.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: NVML's contract: `buf` points to `len` writable bytes; the text and its NUL fit
    // (checked above).
    let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), text.len() + 1) };
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()] = 0;
    SUCCESS
}

fn fill<const N: usize>(field: &mut [c_char; N], text: &str) {
    for (slot, byte) in field.iter_mut().zip(text.bytes().chain(std::iter::repeat(0))) {
        *slot = byte as c_char;
    }
    field[N - 1] = 0;
}

fn pci_info(domain: u32, bus: u32, device_id: u32) -> nvmlPciInfo_t {
    let mut pci = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain,
        bus,
        device: 0,
        pciDeviceId: device_id,
        pciSubSystemId: 0x16c1_10de,
        busId: [0; 32],
    };
    fill(&mut pci.busIdLegacy, &format!("{domain:04X}:{bus:02X}:00.0"));
    fill(&mut pci.busId, &format!("{domain:08X}:{bus:02X}:00.0"));
    pci
}

/// Runs `read` on the initialised node (after taking in new commands).
fn with_node(read: impl FnOnce(&mut Node) -> nvmlReturn_t) -> nvmlReturn_t {
    let mut lib = control::lock();
    lib.poll();
    match lib.node_mut() {
        Some(node) => read(node),
        None => UNINITIALIZED,
    }
}

/// Runs `read` on the GPU behind `device`: GPU_IS_LOST for a GPU that fell off the bus.
fn with_gpu(device: nvmlDevice_t, read: impl FnOnce(&Node, &Gpu) -> nvmlReturn_t) -> nvmlReturn_t {
    with_node(|node| match device_index(device).and_then(|i| node.gpus.get(i)) {
        None => INVALID_ARGUMENT,
        Some(gpu) if gpu.lost => GPU_IS_LOST,
        Some(gpu) => read(node, gpu),
    })
}

// === initialisation ===

fn init() -> nvmlReturn_t {
    let mut lib = control::lock();
    let config = match lib.load_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("flotilla-nvml-mock: {e}");
            return UNKNOWN;
        }
    };
    match config.init {
        InitOutcome::Ok => {}
        InitOutcome::DriverNotLoaded => return DRIVER_NOT_LOADED,
        InitOutcome::NoPermission => return NO_PERMISSION,
    }
    lib.initialise(config);
    SUCCESS
}

/// `nvmlInit_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

/// `nvmlInitWithFlags` (flags ignored).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

/// `nvmlShutdown`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    if control::lock().shutdown() { SUCCESS } else { UNINITIALIZED }
}

/// `nvmlErrorString`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        NO_PERMISSION => c"Insufficient Permissions",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        TIMEOUT => c"Timeout",
        GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

/// `nvmlSystemGetDriverVersion`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, len: c_uint) -> nvmlReturn_t {
    with_node(|_| put_str(version, len, "570.00 (flotilla-nvml-mock)"))
}

// === devices ===

/// `nvmlDeviceGetCount_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    with_node(|node| put(count, node.gpus.len() as c_uint))
}

/// `nvmlDeviceGetHandleByIndex_v2`: a lost GPU still has a handle; calls on it fail.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_node(|node| {
        if index as usize >= node.gpus.len() {
            return INVALID_ARGUMENT;
        }
        put(device, device_handle(index))
    })
}

/// `nvmlDeviceGetIndex`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetIndex(device: nvmlDevice_t, index: *mut c_uint) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| put(index, gpu.index))
}

/// `nvmlDeviceGetUUID`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| put_str(uuid, len, &gpu.uuid))
}

/// `nvmlDeviceGetName`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    len: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |node, _| put_str(name, len, node.config.model.name))
}

/// `nvmlDeviceGetPciInfo_v3`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_gpu(device, |node, gpu| put(pci, pci_info(0, gpu.bus, node.config.model.pci_device_id)))
}

/// `nvmlDeviceGetMemoryInfo_v2`: refuses a struct version other than `nvmlMemory_v2`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| {
        if memory.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: non-null (checked) and, by NVML's contract, an initialised nvmlMemory_v2_t
        // whose `version` the caller set.
        let version = unsafe { (*memory).version };
        if version != (std::mem::size_of::<nvmlMemory_v2_t>() as c_uint | (2 << 24)) {
            return ARGUMENT_VERSION_MISMATCH;
        }
        let reserved = 452 << 20;
        put(
            memory,
            nvmlMemory_v2_t {
                version,
                total: gpu.memory_total,
                reserved,
                free: gpu.memory_total - gpu.memory_used - reserved,
                used: gpu.memory_used,
            },
        )
    })
}

/// `nvmlDeviceGetTemperature` (sensor 0, the GPU core, is the only one).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(
        device,
        |_, gpu| if sensor == 0 { put(temp, gpu.temperature_c) } else { INVALID_ARGUMENT },
    )
}

/// `nvmlDeviceGetTemperatureThreshold`: shutdown (0) and slowdown (1).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTemperatureThreshold(
    device: nvmlDevice_t,
    threshold: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |node, _| match threshold {
        0 => put(temp, node.config.model.shutdown_c),
        1 => put(temp, node.config.model.slowdown_c),
        _ => NOT_SUPPORTED,
    })
}

/// `nvmlDeviceGetPowerUsage`, mW.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| put(power, gpu.power_mw))
}

/// `nvmlDeviceGetTotalEnergyConsumption`, mJ.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |node, gpu| put(energy, node.energy_mj(gpu)))
}

/// `nvmlDeviceGetUtilizationRates`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| put(util, nvmlUtilization_t { gpu: gpu.util.0, memory: gpu.util.1 }))
}

/// `nvmlDeviceGetClockInfo`: graphics (0), SM (1), memory (2), video (3).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock: c_uint,
    mhz: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |node, _| match clock {
        0 | 1 => put(mhz, node.config.model.sm_clock_mhz),
        2 => put(mhz, node.config.model.mem_clock_mhz),
        3 => put(mhz, 1_755),
        _ => INVALID_ARGUMENT,
    })
}

/// `nvmlDeviceGetTotalEccErrors`: error type corrected (0) / uncorrected (1), counter volatile
/// (0) / aggregate (1).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: c_uint,
    counter: c_uint,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |_, gpu| {
        let pair = match error_type {
            0 => gpu.ecc_corrected,
            1 => gpu.ecc_uncorrected,
            _ => return INVALID_ARGUMENT,
        };
        match counter {
            0 => put(count, pair.0),
            1 => put(count, pair.1),
            _ => INVALID_ARGUMENT,
        }
    })
}

/// `nvmlDeviceGetRetiredPages`: Hopper replaced page retirement by row remapping.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    _cause: c_uint,
    _count: *mut c_uint,
    _addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |_, _| NOT_SUPPORTED)
}

/// `nvmlDeviceGetRetiredPages_v2`: NOT_SUPPORTED, as above.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    _cause: c_uint,
    _count: *mut c_uint,
    _addresses: *mut c_ulonglong,
    _timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |_, _| NOT_SUPPORTED)
}

/// `nvmlDeviceGetRetiredPagesPendingStatus`: NOT_SUPPORTED, as above.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: nvmlDevice_t,
    _pending: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |_, _| NOT_SUPPORTED)
}

/// `nvmlDeviceGetCurrentClocksThrottleReasons`: thermal slowdown bits while at or above the
/// slowdown temperature.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |node, gpu| {
        let hot = gpu.temperature_c >= node.config.model.slowdown_c;
        // HW slowdown (0x8) | SW thermal slowdown (0x20) | HW thermal slowdown (0x40).
        put(reasons, if hot { 0x8 | 0x20 | 0x40 } else { 0 })
    })
}

/// `nvmlDeviceGetPcieReplayCounter`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPcieReplayCounter(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |_, _| put(count, 0))
}

fn field_value(
    node: &Node,
    gpu: &Gpu,
    field: c_uint,
) -> Result<(c_uint, nvmlValue_t), nvmlReturn_t> {
    let uint = |v: u64| Ok((VALUE_UINT, nvmlValue_t { uiVal: v as c_uint }));
    let ull = |v: u64| Ok((VALUE_ULL, nvmlValue_t { ullVal: v }));
    let nvlink = |counter: usize| {
        if node.config.model.nvlinks == 0 {
            Err(NOT_SUPPORTED)
        } else {
            ull(gpu.nvlink_errors[counter])
        }
    };
    match field {
        fi::NVML_FI_DEV_MEMORY_TEMP => uint(u64::from(gpu.memory_temperature_c)),
        fi::NVML_FI_DEV_REMAPPED_COR => uint(gpu.remapped_rows.0),
        fi::NVML_FI_DEV_REMAPPED_UNC => uint(gpu.remapped_rows.1),
        fi::NVML_FI_DEV_REMAPPED_PENDING => uint(0),
        fi::NVML_FI_DEV_REMAPPED_FAILURE => uint(u64::from(gpu.remap_failure)),
        fi::NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL => nvlink(0),
        fi::NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL => nvlink(1),
        fi::NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL => nvlink(2),
        fi::NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL => nvlink(3),
        // Page retirement (NVML_FI_DEV_RETIRED_*) and everything else: not on this GPU.
        _ => Err(NOT_SUPPORTED),
    }
}

/// `nvmlDeviceGetFieldValues`: each value carries its own result, as in NVML.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    with_gpu(device, |node, gpu| {
        let Ok(count) = usize::try_from(count) else { return INVALID_ARGUMENT };
        if values.is_null() {
            return INVALID_ARGUMENT;
        }
        // SAFETY: NVML's contract: `values` points to `count` initialised nvmlFieldValue_t whose
        // `fieldId`s the caller set; non-null was checked above.
        let values = unsafe { std::slice::from_raw_parts_mut(values, count) };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        for value in values {
            value.timestamp = now;
            value.latencyUsec = 0;
            match field_value(node, gpu, value.fieldId) {
                Ok((kind, v)) => {
                    value.valueType = kind;
                    value.value = v;
                    value.nvmlReturn = SUCCESS;
                }
                Err(e) => value.nvmlReturn = e,
            }
        }
        SUCCESS
    })
}

// === NVLink ===

fn with_link(
    device: nvmlDevice_t,
    link: c_uint,
    read: impl FnOnce(&Node, &Gpu) -> nvmlReturn_t,
) -> nvmlReturn_t {
    with_gpu(device, |node, gpu| match node.config.model.nvlinks {
        0 => NOT_SUPPORTED,
        links if link >= links => INVALID_ARGUMENT,
        _ => read(node, gpu),
    })
}

/// `nvmlDeviceGetNvLinkState`: every link of an NVLink model is up.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetNvLinkState(
    device: nvmlDevice_t,
    link: c_uint,
    active: *mut c_uint,
) -> nvmlReturn_t {
    with_link(device, link, |_, _| put(active, 1))
}

/// `nvmlDeviceGetNvLinkRemotePciInfo_v2`: link `l` ends at NVSwitch `l % 4` (bus 0x05..0x08).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetNvLinkRemotePciInfo_v2(
    device: nvmlDevice_t,
    link: c_uint,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    with_link(device, link, |_, _| put(pci, pci_info(0, 0x05 + link % NVSWITCHES, 0x22a3_10de)))
}

/// `nvmlDeviceGetNvLinkErrorCounter`: the counters are on link 0, the other links are clean.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: nvmlDevice_t,
    link: c_uint,
    counter: c_uint,
    value: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_link(device, link, |_, gpu| match (link, counter) {
        (0, 0..=3) => put(value, gpu.nvlink_errors[counter as usize]),
        (_, 0..=4) => put(value, 0),
        _ => INVALID_ARGUMENT,
    })
}

// === events ===

/// `nvmlEventSetCreate`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    with_node(|node| {
        node.sets.push(Some(Default::default()));
        put(set, set_handle(node.sets.len() - 1))
    })
}

/// `nvmlDeviceGetSupportedEventTypes`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |_, _| put(types, event_type::SUPPORTED))
}

/// `nvmlDeviceRegisterEvents`: NOT_SUPPORTED for types outside the supported ones, as NVML.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    let mut lib = control::lock();
    lib.poll();
    let Some(node) = lib.node_mut() else { return UNINITIALIZED };
    let Some(gpu) = device_index(device).and_then(|i| node.gpus.get(i)) else {
        return INVALID_ARGUMENT;
    };
    if gpu.lost {
        return GPU_IS_LOST;
    }
    if types & !event_type::SUPPORTED != 0 {
        return NOT_SUPPORTED;
    }
    let index = gpu.index;
    let Some(Some(entry)) = set.addr().checked_sub(SET_BASE).and_then(|id| node.sets.get_mut(id))
    else {
        return INVALID_ARGUMENT;
    };
    entry.registered.push((index, types));
    lib.log(&format!("register gpu={index} types={types:#x}"));
    SUCCESS
}

/// `nvmlEventSetWait_v2`: the oldest pending event of the set, or TIMEOUT after `timeout_ms`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        {
            let mut lib = control::lock();
            lib.poll();
            let Some(node) = lib.node_mut() else { return UNINITIALIZED };
            let Some(Some(entry)) =
                set.addr().checked_sub(SET_BASE).and_then(|id| node.sets.get_mut(id))
            else {
                return INVALID_ARGUMENT;
            };
            if let Some(event) = entry.pending.pop_front() {
                lib.log(&format!(
                    "deliver gpu={} type={:#x} data={}",
                    event.gpu, event.event_type, event.data
                ));
                return put(
                    data,
                    nvmlEventData_t {
                        device: device_handle(event.gpu),
                        eventType: event.event_type,
                        eventData: event.data,
                        gpuInstanceId: u32::MAX,
                        computeInstanceId: u32::MAX,
                    },
                );
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return TIMEOUT;
        }
        std::thread::sleep(EVENT_POLL.min(deadline - now));
    }
}

/// `nvmlEventSetFree`.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    with_node(|node| match set.addr().checked_sub(SET_BASE).and_then(|id| node.sets.get_mut(id)) {
        Some(slot @ Some(_)) => {
            *slot = None;
            SUCCESS
        }
        _ => INVALID_ARGUMENT,
    })
}
