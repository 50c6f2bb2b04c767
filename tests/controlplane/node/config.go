package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// containerdConfig is containerd 1.6's configuration (version 2): its own root, state and
// sockets under dir, the CRI plugin with runc under the cgroupfs driver, the local pause image,
// and the CNI plugins of Debian's containernetworking-plugins.
func containerdConfig(dir, socket, runc string) string {
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = %[5]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[6]q
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # Lowering an oom_score_adj needs CAP_SYS_RESOURCE, which a machine may withhold even from
  # root (this one does): keep every container's at or above containerd's own.
  restrict_oom_score_adj = true

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = %[8]q
        Root = %[9]q

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = %[7]q
    max_conf_num = 1
`,
		filepath.Join(dir, "containerd", "root"),
		filepath.Join(dir, "containerd", "state"),
		socket,
		socket+".ttrpc",
		filepath.Join(dir, "containerd", "opt"),
		pauseImage,
		filepath.Join(dir, "cni", "net.d"),
		runc,
		filepath.Join(dir, "runc"),
	)
}

// writeCNIConfig writes the pods' network: the bridge (made beforehand, with the gateway
// address) and host-local addresses on subnet, port mappings through portmap. containerd adds
// the loopback interface itself (with the loopback plugin).
func writeCNIConfig(confDir, ipamDir, subnet string) error {
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		return err
	}
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "flotilla-node",
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      bridge,
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":    "host-local",
					"ranges":  [][]map[string]string{{{"subnet": subnet}}},
					"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
					"dataDir": ipamDir,
				},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(confDir, "10-flotilla.conflist"), data, 0o644)
}

// kubeletConfig is the KubeletConfiguration of the test node. cgroup v1 is allowed
// (failCgroupV1: false) with the cgroupfs driver, as containerd uses; the kubelet's API is open
// to the apiserver without credentials (anonymous, AlwaysAllow: a loopback test node only);
// image garbage collection and disk eviction are off, so a full disk on a shared machine never
// evicts the test's pods. Pods resolve names through the node's cluster DNS (dns.go) on the
// bridge's address.
func kubeletConfig(dir, containerd, address string, port, healthzPort int) string {
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /%[1]s
containerRuntimeEndpoint: unix://%[2]s
address: %[6]s
port: %[3]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %[4]d
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
podLogsDir: %[5]s
failSwapOn: false
resolvConf: /etc/resolv.conf
clusterDNS: [%[7]s]
clusterDomain: cluster.local
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "0%%"
  nodefs.inodesFree: "0%%"
  imagefs.available: "0%%"
serializeImagePulls: false
registerNode: true
nodeStatusReportFrequency: 10s
`, cgroupRoot, containerd, port, healthzPort, filepath.Join(dir, "pod-logs"), address, address)
}
