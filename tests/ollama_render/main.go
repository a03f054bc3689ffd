// Renders Ollama TEMPLATEs the way Ollama's server does, with Go's text/template (standard
// library only, Go >= 1.13), for the parity tests.
//
// stdin:  {"template": "...", "system": "<Modelfile SYSTEM>", "cases": [{"messages": [...]} | {"prompt": "..."}]}
// stdout: JSON list of rendered strings, one per case.
//
// Chat cases follow Ollama's chat handler and template.Execute: the Modelfile's SYSTEM is put
// first when the conversation does not start with a system message; then collate() joins all
// system messages into .System and merges consecutive messages of one role with a blank line;
// the template sees .System, .Messages (with .Role/.Content), .Tools, .Response (empty).
// Prompt cases render the legacy variables .System, .Prompt, .Response.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Messages []Message `json:"messages"`
	Prompt   *string   `json:"prompt"`
}

type Input struct {
	Template string `json:"template"`
	System   string `json:"system"`
	Cases    []Case `json:"cases"`
}

var funcs = template.FuncMap{
	"json": func(v interface{}) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template does not parse:", err)
		os.Exit(3)
	}
	out := make([]string, 0, len(in.Cases))
	for _, c := range in.Cases {
		var b strings.Builder
		var vars map[string]interface{}
		if c.Prompt != nil {
			vars = map[string]interface{}{"System": in.System, "Prompt": *c.Prompt, "Response": ""}
		} else {
			msgs := append([]Message(nil), c.Messages...)
			if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
				msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
			}
			system, collated := collate(msgs)
			vars = map[string]interface{}{
				"System": system, "Messages": collated, "Tools": nil, "Response": "",
				"Think": false, "IsThinkSet": false,
			}
		}
		if err := tmpl.Execute(&b, vars); err != nil {
			fmt.Fprintln(os.Stderr, "template does not execute:", err)
			os.Exit(4)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
