package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

// options are the control plane's own flags; everything else is fixed for a loopback test cluster.
type options struct {
	dir         string
	kubeconfig  string
	port        int
	controllers string
	readyWithin time.Duration
	stdinEOF    bool
	pods        bool
}

func parseOptions(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("controlplane", flag.ContinueOnError)
	fs.StringVar(&o.dir, "dir", "", "directory for etcd data, certificates and logs (default: a new temporary directory); what this run creates there, or the directory itself if this run created it, is removed at shutdown")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "where to write the admin kubeconfig (default: <dir>/kubeconfig)")
	fs.IntVar(&o.port, "port", 0, "kube-apiserver secure port on 127.0.0.1 (0 picks a free one)")
	fs.StringVar(&o.controllers, "controllers", "garbage-collector-controller,namespace-controller",
		"kube-controller-manager controllers to run beside the apiserver (empty runs none)")
	fs.DurationVar(&o.readyWithin, "ready-timeout", 3*time.Minute, "how long to wait for /readyz")
	fs.BoolVar(&o.stdinEOF, "exit-on-stdin-close", false,
		"shut down cleanly when standard input closes: a parent that holds the pipe (a test binary) stops the control plane by exiting, even when it panics or is killed")
	fs.BoolVar(&o.pods, "pods", false,
		"admit Pods as a cluster with nodes does: turns on the ServiceAccount admission plugin (token volumes), so every namespace needs its default ServiceAccount (the serviceaccount controller, which the test node runs)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q (flags are --dir, --kubeconfig, --port, --controllers, --ready-timeout, --exit-on-stdin-close, --pods)", fs.Arg(0))
	}
	if o.port < 0 || o.port > 65535 {
		return nil, fmt.Errorf("--port: expected 0..65535, got %d", o.port)
	}
	return o, nil
}

func runControlPlane(args []string) error {
	opts, err := parseOptions(args)
	if err != nil {
		return err
	}

	// Our own signal channel sits beside the apiserver's handler: both see SIGTERM/SIGINT.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	// A parent that reads our output through pipes may be gone before we finish shutting down;
	// by default Go exits on the first write to such a pipe, skipping the clean-up below.
	signal.Ignore(syscall.SIGPIPE)
	stdinClosed := make(chan struct{})
	if opts.stdinEOF {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			close(stdinClosed)
		}()
	}

	// Everything this run creates is removed at shutdown: the whole --dir when this run created
	// it (or a temporary one), otherwise only the run directory made inside it.
	base, createdBase := opts.dir, false
	if base == "" {
		if base, err = os.MkdirTemp("", "flotilla-controlplane-"); err != nil {
			return err
		}
		createdBase = true
	} else if _, statErr := os.Stat(base); errors.Is(statErr, os.ErrNotExist) {
		if err := os.MkdirAll(base, 0o755); err != nil {
			return err
		}
		createdBase = true
	}
	runDir, err := os.MkdirTemp(base, "run-")
	if err != nil {
		return err
	}
	defer func() {
		if createdBase {
			os.RemoveAll(base)
		} else {
			os.RemoveAll(runDir)
		}
	}()
	if opts.kubeconfig == "" {
		opts.kubeconfig = filepath.Join(base, "kubeconfig")
	}
	defer os.Remove(opts.kubeconfig)

	certs, err := newPKI(filepath.Join(runDir, "pki"))
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}

	etcd, etcdURL, err := startEtcd(filepath.Join(runDir, "etcd"))
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		logf("etcd stopped")
	}()
	logf("etcd ready at %s", etcdURL)

	port := opts.port
	if port == 0 {
		if port, err = freePort(); err != nil {
			return err
		}
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	apiserverDone := make(chan error, 1)
	go func() {
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(apiserverArgs(certs, etcdURL, port, filepath.Join(runDir, "apiserver"), opts.pods))
		apiserverDone <- cmd.Execute()
	}()

	started := time.Now()
	if err := waitReady(server, certs, opts.readyWithin, apiserverDone); err != nil {
		stopApiserver(apiserverDone)
		return err
	}
	logf("kube-apiserver ready at %s after %s", server, time.Since(started).Round(time.Millisecond))

	if err := writeKubeconfig(opts.kubeconfig, server, certs); err != nil {
		stopApiserver(apiserverDone)
		return fmt.Errorf("writing kubeconfig: %w", err)
	}

	var controllerManager *exec.Cmd
	if opts.controllers != "" {
		controllerManager, err = startControllerManager(opts.kubeconfig, opts.controllers, runDir)
		if err != nil {
			stopApiserver(apiserverDone)
			return fmt.Errorf("starting kube-controller-manager: %w", err)
		}
	}

	// The one line a caller waits for; the kubeconfig exists before it is printed.
	fmt.Printf("controlplane ready: server=%s kubeconfig=%s\n", server, opts.kubeconfig)

	var runErr error
	// A signal from outside has already reached the apiserver's own handler; signalling it again
	// would make it exit the whole process before etcd is closed and the data removed.
	apiserverSignalled := false
	select {
	case sig := <-signals:
		logf("received %s, shutting down", sig)
		apiserverSignalled = true
	case <-stdinClosed:
		logf("standard input closed, shutting down")
	case err := <-apiserverDone:
		runErr = fmt.Errorf("kube-apiserver exited: %v", err)
		apiserverDone <- nil
	}
	if controllerManager != nil {
		stopProcess(controllerManager, 10*time.Second)
	}
	if apiserverSignalled {
		waitApiserver(apiserverDone)
	} else {
		stopApiserver(apiserverDone)
	}
	return runErr
}

func apiserverArgs(certs *pki, etcdURL string, port int, certDir string, pods bool) []string {
	// Without nodes no Pod runs, and without the serviceaccount controller a namespace has no
	// default ServiceAccount for the admission plugin to find: off unless Pods are to run.
	admission := "--disable-admission-plugins=ServiceAccount"
	if pods {
		admission = "--enable-admission-plugins=ServiceAccount"
	}
	return []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + certs.servingCert,
		"--tls-private-key-file=" + certs.servingKey,
		"--client-ca-file=" + certs.caCertFile,
		"--token-auth-file=" + certs.tokenFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--api-audiences=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + certs.saKey,
		"--service-account-signing-key-file=" + certs.saKey,
		"--service-cluster-ip-range=10.0.0.0/24",
		admission,
		// A test node is named after no resolvable host: reach its kubelet at its InternalIP.
		"--kubelet-preferred-address-types=InternalIP",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"--v=0",
	}
}

// stopApiserver asks the apiserver to stop (its own signal handler cancels its context) and waits.
func stopApiserver(done chan error) {
	select {
	case <-done:
		return
	default:
	}
	// The apiserver installs its own SIGTERM handler; a signal to ourselves is the only way in.
	// A second signal would make it exit the process at once, so send exactly one.
	_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
	waitApiserver(done)
}

func waitApiserver(done chan error) {
	select {
	case <-done:
		logf("kube-apiserver stopped")
	case <-time.After(60 * time.Second):
		logf("kube-apiserver did not stop within 60s; stopping etcd anyway")
	}
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	cfg := embed.NewConfig()
	cfg.Name = "flotilla"
	cfg.Dir = dir
	cfg.UnsafeNoFsync = true // test data, removed at shutdown
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{"stderr"}
	clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ListenMetricsUrls = nil

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("etcd was not ready within 60s")
	}
}

func waitReady(server string, certs *pki, within time.Duration, apiserverDone chan error) error {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(certs.caCertPEM)
	client := &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}},
	}
	deadline := time.Now().Add(within)
	var last string
	for time.Now().Before(deadline) {
		select {
		case err := <-apiserverDone:
			apiserverDone <- err
			return fmt.Errorf("kube-apiserver exited before it was ready: %v", err)
		default:
		}
		req, _ := http.NewRequestWithContext(context.Background(), http.MethodGet, server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+certs.adminToken)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready within %s (last answer from /readyz: %s)", within, last)
}

// writeKubeconfig writes the admin kubeconfig to a temporary name and renames it, so a reader
// never sees half a file.
func writeKubeconfig(path, server string, certs *pki) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	content := strings.Join([]string{
		"apiVersion: v1",
		"kind: Config",
		"clusters:",
		"- name: flotilla-test",
		"  cluster:",
		"    server: " + server,
		"    certificate-authority-data: " + base64.StdEncoding.EncodeToString(certs.caCertPEM),
		"users:",
		"- name: admin",
		"  user:",
		"    token: " + certs.adminToken,
		"contexts:",
		"- name: flotilla-test",
		"  context:",
		"    cluster: flotilla-test",
		"    user: admin",
		"    namespace: default",
		"current-context: flotilla-test",
		"",
	}, "\n")
	tmp, err := os.CreateTemp(filepath.Dir(path), ".kubeconfig-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// startControllerManager runs this same binary as kube-controller-manager in a child process: it
// installs a process-wide signal handler of its own, as the apiserver does, so the two cannot
// share one process.
func startControllerManager(kubeconfig, controllers, runDir string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(runDir, "kube-controller-manager.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "kube-controller-manager",
		"--kubeconfig="+kubeconfig,
		"--authentication-kubeconfig="+kubeconfig,
		"--authorization-kubeconfig="+kubeconfig,
		"--controllers="+controllers,
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--cert-dir="+filepath.Join(runDir, "kube-controller-manager"),
		"--v=0",
	)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// If this process dies without cleaning up, the child must not outlive it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, err
	}
	go func() {
		_ = cmd.Wait()
		logFile.Close()
	}()
	logf("kube-controller-manager started (controllers %s), log %s", controllers, logFile.Name())
	return cmd, nil
}

func stopProcess(cmd *exec.Cmd, grace time.Duration) {
	if cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "controlplane: "+format+"\n", args...)
}
