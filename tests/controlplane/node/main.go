// Command flotilla-node runs one real Kubernetes node beside a test control plane: containerd
// (with runc and the CNI bridge plugins), the kubelet, and the kube-controller-manager and
// kube-scheduler that Deployments and DaemonSets need. It is the node of Flotilla's install
// tests; tests/src/node.rs starts it.
//
// Everything it changes on the machine is recorded before it is changed and undone when it stops
// (SIGTERM, SIGINT, or its standard input closing with --exit-on-stdin-close), and again by the
// next run if this one was killed: the bridge, the NAT chain, the pod cgroups, the sysctls the
// kubelet sets, the sandboxes' network namespaces and mounts. One node runs at a time on a
// machine (a lock file), since the bridge, the NAT chain and the sysctls are machine-wide.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// options are the node's flags.
type options struct {
	dir        string
	kubeconfig string
	name       string
	binDir     string
	images     []string
	subnet     string
	runc       string
	stdinEOF   bool
	lockWait   time.Duration
}

const (
	lockFile  = "/run/flotilla-node.lock"
	stateFile = "/run/flotilla-node.state"
	// The pause image scripts/images.sh builds; containerd's sandbox image.
	pauseImage = "flotilla.local/pause:1"
	bridge     = "flotilla0"
	natChain   = "FLOTILLA-NODE"
	cgroupRoot = "flotilla-node"
	// The ClusterIP of the `kubernetes` Service (the apiserver's --service-cluster-ip-range is
	// 10.0.0.0/24): pods reach the apiserver there, NATed to its loopback address.
	apiserverServiceIP = "10.0.0.1"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		logf("%v", err)
		os.Exit(1)
	}
}

func parseOptions(args []string) (*options, error) {
	o := &options{}
	var images string
	fs := flag.NewFlagSet("flotilla-node", flag.ContinueOnError)
	fs.StringVar(&o.dir, "dir", "", "directory for containerd, kubelet and the logs (required; created, and removed at shutdown)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "the control plane's admin kubeconfig (required)")
	fs.StringVar(&o.name, "name", "flotilla-node", "the Node's name")
	fs.StringVar(&o.binDir, "bin-dir", "", "directory of kubelet, kube-scheduler, kube-controller-manager (default: this binary's directory)")
	fs.StringVar(&images, "images", "", "comma-separated OCI archives imported into containerd before the kubelet starts (must include "+pauseImage+")")
	fs.StringVar(&o.subnet, "pod-subnet", "10.244.77.0/24", "the pods' subnet on the bridge "+bridge+" (a /24; .1 is the bridge)")
	fs.StringVar(&o.runc, "runc", "runc", "the OCI runtime binary containerd's shim runs")
	fs.BoolVar(&o.stdinEOF, "exit-on-stdin-close", false, "stop, and undo everything, when standard input closes")
	fs.DurationVar(&o.lockWait, "lock-timeout", 5*time.Minute, "how long to wait for another node on this machine to stop")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.dir == "" || !filepath.IsAbs(o.dir) {
		return nil, fmt.Errorf("--dir: expected an absolute path, got %q", o.dir)
	}
	if o.kubeconfig == "" {
		return nil, errors.New("--kubeconfig: required")
	}
	if !strings.HasSuffix(o.subnet, ".0/24") {
		return nil, fmt.Errorf("--pod-subnet: expected a.b.c.0/24, got %q", o.subnet)
	}
	if images != "" {
		o.images = strings.Split(images, ",")
	}
	if o.binDir == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		o.binDir = filepath.Dir(self)
	}
	return o, nil
}

func run(args []string) error {
	opts, err := parseOptions(args)
	if err != nil {
		return err
	}
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	signal.Ignore(syscall.SIGPIPE)
	stdinClosed := make(chan struct{})
	if opts.stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			close(stdinClosed)
		}()
	}

	unlock, err := lock(opts.lockWait)
	if err != nil {
		return err
	}
	defer unlock()
	if previous, err := readState(); err == nil {
		logf("undoing what an earlier node left (dir %s)", previous.Dir)
		previous.undo()
	}

	server, caPEM, err := readKubeconfig(opts.kubeconfig)
	if err != nil {
		return fmt.Errorf("--kubeconfig %s: %w", opts.kubeconfig, err)
	}
	apiserver, err := url.Parse(server)
	if err != nil {
		return fmt.Errorf("--kubeconfig %s: server %q: %w", opts.kubeconfig, server, err)
	}

	st := &state{Dir: opts.dir, Bridge: bridge, NATChain: natChain, CgroupRoot: cgroupRoot,
		Containerd: filepath.Join(opts.dir, "containerd.sock")}
	if err := os.MkdirAll(opts.dir, 0o755); err != nil {
		return err
	}
	st.Sysctls = saveSysctls()
	st.ForeignNetns = sandboxNetns()
	st.KubeletChains = !kubeletChainsExist()
	if err := st.write(); err != nil {
		return err
	}
	defer st.undo()

	n := &node{opts: opts, state: st, apiserverHost: apiserver.Host, caPEM: caPEM}
	started := time.Now()
	runErr := n.start()
	if runErr == nil {
		logf("node %s ready after %s", opts.name, time.Since(started).Round(time.Millisecond))
		fmt.Printf("node ready: name=%s containerd=%s dir=%s\n", opts.name, st.Containerd, opts.dir)
		select {
		case sig := <-signals:
			logf("received %s, stopping", sig)
		case <-stdinClosed:
			logf("standard input closed, stopping")
		case err := <-n.exited:
			runErr = err
		}
	}
	n.stop()
	return runErr
}

func readKubeconfig(path string) (server string, caPEM []byte, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		line := strings.TrimSpace(scanner.Text())
		if v, ok := strings.CutPrefix(line, "server: "); ok {
			server = v
		}
		if v, ok := strings.CutPrefix(line, "certificate-authority-data: "); ok {
			caPEM, err = decodeBase64(v)
			if err != nil {
				return "", nil, fmt.Errorf("certificate-authority-data: %w", err)
			}
		}
	}
	if server == "" || caPEM == nil {
		return "", nil, errors.New("expected a server and certificate-authority-data, found none")
	}
	return server, caPEM, scanner.Err()
}

// child is a process of the node, killed with SIGKILL if this process dies first.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

func (n *node) spawn(name string, program string, args ...string) (*child, error) {
	logPath := filepath.Join(n.opts.dir, name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(program, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() {
		err := cmd.Wait()
		logFile.Close()
		close(c.done)
		select {
		case n.exited <- fmt.Errorf("%s exited (%v); its log: %s\n%s", name, err, logPath, tail(logPath, 20)):
		default:
		}
	}()
	logf("%s started, log %s", name, logPath)
	return c, nil
}

// stop sends SIGTERM, then SIGKILL after grace.
func (c *child) stop(grace time.Duration) {
	if c == nil {
		return
	}
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(grace):
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

func (c *child) running() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

func tail(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "flotilla-node: "+format+"\n", args...)
}
