import {
  AssistantRuntimeProvider,
  AuiConfig,
  Tools,
  unstable_createMessageConverter,
  useAssistantTransportRuntime,
  type AssistantTransportConnectionMetadata,
  type AssistantTransportProtocol,
} from "@assistant-ui/react";
import { convertLangChainMessages, type LangChainMessage } from "@assistant-ui/react-langgraph";
import type { ReactNode } from "react";
import toolkit from "./toolkit";

// The backend's state: LangChain-style messages, as assistant-ui's own example keeps them.
type State = { messages: LangChainMessage[] };

const messages = unstable_createMessageConverter(convertLangChainMessages);

const converter = (state: State, { pendingCommands, isSending }: AssistantTransportConnectionMetadata) => {
  // Show the user's message at once, before the backend sends it back in the state.
  const pending = pendingCommands.flatMap((command): LangChainMessage[] =>
    command.type === "add-message"
      ? [{ type: "human", content: command.message.parts.map((part) => (part.type === "text" ? part.text : "")).join("\n") }]
      : [],
  );
  return { messages: messages.toThreadMessages([...state.messages, ...pending]), isRunning: isSending };
};

export function MyRuntimeProvider({
  api = "http://localhost:8002/assistant",
  protocol = "data-stream", // "assistant-transport" when the backend has STREAM_PROTOCOL=assistant-transport
  onError,
  children,
}: {
  api?: string;
  protocol?: AssistantTransportProtocol;
  onError?: (error: Error) => void;
  children: ReactNode;
}) {
  const runtime = useAssistantTransportRuntime<State>({
    api,
    protocol,
    initialState: { messages: [] },
    converter,
    // Your own headers and body fields reach the backend too; it ignores what it does not read.
    headers: async () => ({ "X-Client": "my-app" }),
    body: { clientVersion: "1.0" },
    capabilities: { edit: true }, // the backend branches at the edited message (parentId, sourceId)
    onError,
  });
  const config = AuiConfig({ tools: Tools({ toolkit }) });
  return (
    <AssistantRuntimeProvider config={config} runtime={runtime}>
      {children}
    </AssistantRuntimeProvider>
  );
}
