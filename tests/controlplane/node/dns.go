package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// clusterDomain is the kubelet's clusterDomain: pods search <ns>.svc.cluster.local,
// svc.cluster.local and cluster.local.
const clusterDomain = "cluster.local"

// clusterDNS is the node's stand-in for CoreDNS: it answers the names of Services the way the
// Kubernetes DNS specification says, from the API server's Services and EndpointSlices.
//
//   - <service>.<namespace>.svc.cluster.local: A records of the ClusterIP; for a headless
//     Service, of its ready endpoints' addresses.
//   - Any other name: NXDOMAIN (the test node's pods reach nothing outside this machine).
//
// It serves UDP only (what a pod's resolver uses for answers this small), on the bridge's
// address, which the kubelet writes into every pod's resolv.conf as its nameserver.
type clusterDNS struct {
	services  cache.Indexer
	endpoints cache.Indexer
	conn      *net.UDPConn
	stopOnce  sync.Once
	stopCh    chan struct{}
}

// startClusterDNS lists and watches Services and EndpointSlices through kubeconfig and serves
// DNS on addr (host:53). It returns once both caches are synced.
func startClusterDNS(kubeconfig, addr string) (*clusterDNS, error) {
	config, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("cluster DNS: kubeconfig %s: %w", kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		return nil, fmt.Errorf("cluster DNS: %w", err)
	}
	udpAddr, err := net.ResolveUDPAddr("udp4", addr)
	if err != nil {
		return nil, fmt.Errorf("cluster DNS: address %q: %w", addr, err)
	}
	conn, err := net.ListenUDP("udp4", udpAddr)
	if err != nil {
		return nil, fmt.Errorf("cluster DNS: listening on %s: %w", addr, err)
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	services := factory.Core().V1().Services().Informer()
	slices := factory.Discovery().V1().EndpointSlices().Informer()
	if err := slices.AddIndexers(cache.Indexers{"service": func(obj any) ([]string, error) {
		s := obj.(*discoveryv1.EndpointSlice)
		return []string{s.Namespace + "/" + s.Labels[discoveryv1.LabelServiceName]}, nil
	}}); err != nil {
		conn.Close()
		return nil, err
	}
	d := &clusterDNS{services: services.GetIndexer(), endpoints: slices.GetIndexer(), conn: conn,
		stopCh: make(chan struct{})}
	factory.Start(d.stopCh)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if !cache.WaitForCacheSync(ctx.Done(), services.HasSynced, slices.HasSynced) {
		d.stop()
		return nil, errors.New("cluster DNS: Services and EndpointSlices not listed within 60s")
	}
	go d.serve()
	logf("cluster DNS serving %s (*.svc.%s)", addr, clusterDomain)
	return d, nil
}

func (d *clusterDNS) stop() {
	if d == nil {
		return
	}
	d.stopOnce.Do(func() {
		close(d.stopCh)
		d.conn.Close()
	})
}

func (d *clusterDNS) serve() {
	buf := make([]byte, 1500)
	for {
		n, from, err := d.conn.ReadFromUDP(buf)
		if err != nil {
			return // closed
		}
		reply, err := d.answer(buf[:n])
		if err != nil {
			continue // not a DNS query: nothing to answer
		}
		_, _ = d.conn.WriteToUDP(reply, from)
	}
}

// answer builds the reply to one query message.
func (d *clusterDNS) answer(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	header, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	question, err := p.Question()
	if err != nil {
		return nil, err
	}
	addrs, known := d.lookup(question.Name.String())
	reply := dnsmessage.Header{ID: header.ID, Response: true, Authoritative: known,
		RecursionDesired: header.RecursionDesired, RCode: dnsmessage.RCodeSuccess}
	if !known {
		reply.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(make([]byte, 0, 512), reply)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(question); err != nil {
		return nil, err
	}
	if err := b.StartAnswers(); err != nil {
		return nil, err
	}
	// A name that exists has no AAAA or other records: NOERROR with no answers.
	if question.Type == dnsmessage.TypeA && question.Class == dnsmessage.ClassINET {
		for _, a := range addrs {
			rh := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: 5}
			if err := b.AResource(rh, dnsmessage.AResource{A: a.As4()}); err != nil {
				return nil, err
			}
		}
	}
	return b.Finish()
}

// lookup resolves <service>.<namespace>.svc.cluster.local; known is false when no such Service
// exists.
func (d *clusterDNS) lookup(name string) (addrs []netip.Addr, known bool) {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	rest, ok := strings.CutSuffix(name, ".svc."+clusterDomain)
	if !ok {
		return nil, false
	}
	service, namespace, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(namespace, ".") {
		return nil, false
	}
	obj, exists, err := d.services.GetByKey(namespace + "/" + service)
	if err != nil || !exists {
		return nil, false
	}
	svc := obj.(*corev1.Service)
	if svc.Spec.ClusterIP != corev1.ClusterIPNone {
		for _, ip := range svc.Spec.ClusterIPs {
			if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
				addrs = append(addrs, a)
			}
		}
		return addrs, true
	}
	slices, _ := d.endpoints.ByIndex("service", namespace+"/"+service)
	for _, obj := range slices {
		for _, ep := range obj.(*discoveryv1.EndpointSlice).Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, ip := range ep.Addresses {
				if a, err := netip.ParseAddr(ip); err == nil && a.Is4() {
					addrs = append(addrs, a)
				}
			}
		}
	}
	return addrs, true
}
